"""The decoder against thousands of generated files: every format and pixel layout intact, then truncated,
overwritten, with inflated header sizes, or junk behind a format's magic. Each is an RGB uint8 image or an
ImageError with one of the known reasons, never any other exception."""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import HealthCheck, given, settings

from c3ae_ray.images import ImageError, decode_image
from tests.hostile import READER_REASONS, hostile_files

def decoded_or_refused(data: bytes) -> str:
    """The decoder's outcome as a tally key; fails the test on anything but an image or a known ImageError."""
    try:
        image = decode_image(data)
    except ImageError as error:
        assert error.reason in READER_REASONS and str(error), (error.reason, str(error))
        return error.reason
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.size > 0, image.shape
    return "image"


def test_every_generated_file_decodes_or_is_refused_with_a_reason():
    outcomes = Counter()

    @settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(hostile_files())
    def check(data):
        outcomes[decoded_or_refused(data)] += 1

    check()
    # the generator is not all one kind of file
    assert sum(outcomes.values()) >= 2000 and {"image", "undecodable", "too_large"} <= set(outcomes), outcomes
