import numpy as np
import pytest

from c3ae_ray.images import to_rgb_uint8


def test_rgb_uint8_passes_through_unchanged():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(image), image)


def test_conversions():
    gray = np.array([[0, 128], [255, 7]], np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(gray)[1, 0], [255, 255, 255])
    np.testing.assert_array_equal(to_rgb_uint8(np.array([[[0.0, 0.5, 1.0]]])), [[[0, 128, 255]]])
    np.testing.assert_array_equal(to_rgb_uint8(np.array([[[65535, 256, 255]]], np.uint16)), [[[255, 1, 0]]])
    np.testing.assert_array_equal(to_rgb_uint8(np.full((2, 2, 4), [1, 2, 3, 4], np.uint8)), np.zeros((2, 2, 3)) + [1, 2, 3])


def test_unsupported_pixel_types_are_rejected():
    with pytest.raises(ValueError, match="int64"):
        to_rgb_uint8(np.zeros((2, 2, 3), np.int64))
