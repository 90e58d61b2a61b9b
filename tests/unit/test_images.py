import io

import cv2
import numpy as np
import pytest

from c3ae_ray.images import ImageError, decode_image, image_size, to_rgb_uint8
from tests.bad_files import png_header_only, write_bad_files


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


def _encode(image: np.ndarray, ext: str) -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


def test_decode_converts_gray_rgba_and_16_bit_to_rgb_uint8():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    np.testing.assert_array_equal(decode_image(_encode(gray, ".png")), np.repeat(gray[:, :, None], 3, axis=2))
    bgra = np.zeros((2, 2, 4), np.uint8) + np.array([10, 20, 30, 0], np.uint8)
    np.testing.assert_array_equal(decode_image(_encode(bgra, ".png")), np.zeros((2, 2, 3)) + [30, 20, 10])
    deep = np.full((2, 3), 0xAB00, np.uint16)
    np.testing.assert_array_equal(decode_image(_encode(deep, ".png")), np.full((2, 3, 3), 0xAB))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_honours_exif_orientation(orientation):
    from PIL import Image, ImageOps

    base = np.zeros((40, 60, 3), np.uint8)
    base[:10, :20] = 255
    base[30:, 50:, 0] = 255
    picture = Image.fromarray(base)
    exif = picture.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", exif=exif, quality=100)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))).convert("RGB"))
    got = decode_image(buffer.getvalue())
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_bad_inputs_raise_image_error_with_a_reason(tmp_path):
    good = _encode(np.full((32, 32, 3), 128, np.uint8), ".jpg")
    expected = write_bad_files(tmp_path, good)
    for name, reason in expected.items():
        with pytest.raises(ImageError) as caught:
            decode_image((tmp_path / name).read_bytes())
        assert caught.value.reason == reason, name


def test_pixel_cap_is_checked_on_the_header_before_decoding():
    assert image_size(png_header_only(9000, 8000)) == (9000, 8000)
    with pytest.raises(ImageError, match="9000x8000"):
        decode_image(png_header_only(9000, 8000))
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(png_header_only(100_000, 100_000))
    small = _encode(np.zeros((30, 40, 3), np.uint8), ".png")
    assert decode_image(small, max_pixels=1200).shape == (30, 40, 3)
    with pytest.raises(ImageError) as caught:
        decode_image(small, max_pixels=1199)
    assert caught.value.reason == "too_large"
