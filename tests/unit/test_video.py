"""Videos: frames sampled at a rate from a clip written at test time from shared photos, with their times;
a file that is not a video is one clear error, raised before any frame."""

from __future__ import annotations

import numpy as np
import pytest

from c3ae_ray.images import ImageError, decode_video, is_video
from tests import fixtures


@pytest.fixture(scope="module")
def clip(shared_data, tmp_path_factory) -> bytes:
    """3 s at 10 fps: ivan.jpg for 1.5 s, then no-faces.jpg for 1.5 s."""
    faces = shared_data / "faces"
    path = fixtures.make_clip(tmp_path_factory.mktemp("video") / "clip.mp4", [faces / "ivan.jpg", faces / "no-faces.jpg"])
    return path.read_bytes()


@pytest.mark.parametrize("fps, times", [(1.0, [0, 1, 2]), (2.5, [0, 0.4, 0.8, 1.2, 1.6, 2.0, 2.4, 2.8]), (0.4, [0, 2.5])])
def test_frames_are_sampled_at_the_rate_with_their_times(clip, fps, times):
    frames = list(decode_video(clip, fps))
    assert [time_s for time_s, _ in frames] == pytest.approx(times)
    assert all(frame.shape == (320, 320, 3) and frame.dtype == np.uint8 for _, frame in frames)
    # the first half shows one photo and the second another: the sampled frames follow the clip
    first, last = frames[0][1].astype(int), frames[-1][1].astype(int)
    assert np.abs(first - last).mean() > 20


def test_what_is_not_a_video_fails_before_any_frame(clip):
    for data, reason in [(b"", "empty"), (b"\x00\x00\x00\x18ftypmp42 then nothing useful" * 3, "undecodable"),
                         (clip[: len(clip) // 3], "undecodable")]:
        frames = decode_video(data)
        with pytest.raises(ImageError) as raised:
            next(frames)
        assert raised.value.reason == reason
    with pytest.raises(ImageError, match="over the cap") as raised:
        next(decode_video(clip, max_pixels=320 * 319))
    assert raised.value.reason == "too_large"


def test_videos_are_told_by_extension():
    assert is_video("a/clip.MP4") and is_video("s3://b/x.webm") and not is_video("face.jpg") and not is_video("mp4")
