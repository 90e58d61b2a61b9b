"""Hostile inputs, generated: image files in every format and pixel layout the readers meet (EXIF orientations,
CMYK, palettes, 16-bit and float pixels, animations), then broken (truncated, bytes overwritten, sizes in the
header inflated, junk behind a format's magic); and bodies of the age API in each form it takes (raw, JSON,
multipart) with wrong types and malformed or repeated fields.

The builders are plain functions of their parameters: hypothesis strategies draw the parameters (the property
tests and benchmarks/hostile_inputs.py), and `hostile_folder` draws them from a seeded generator (the batch
stages' tests, which need the same files every run)."""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from PIL import Image

# Pillow's writable (format, pixel mode) pairs; the API accepts JPEG, PNG and WebP, the batch stages all of them.
MODES = {
    "JPEG": ["RGB", "L", "CMYK"],
    "PNG": ["RGB", "RGBA", "L", "LA", "P", "1", "I;16"],
    "WEBP": ["RGB", "RGBA"],
    "GIF": ["P", "L"],
    "TIFF": ["RGB", "RGBA", "L", "LA", "CMYK", "I;16", "F", "I", "1", "P"],
    "BMP": ["RGB", "L", "P", "1"],
}
ANIMATED = {"GIF", "WEBP", "PNG", "TIFF"}  # Pillow writes several frames (APNG, multi-page TIFF)
WITH_EXIF = {"JPEG", "PNG", "WEBP"}
MAGIC = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"GIF89a", b"II*\x00", b"MM\x00*", b"BM"]
BREAKS = ["intact", "truncated", "overwritten", "inflated", "junk"]
READER_REASONS = {"empty", "undecodable", "too_large"}  # every ImageError the decoder may raise


def image_file(fmt: str, mode: str, width: int, height: int, frames: int = 1, orientation: int = 1, seed: int = 0) -> bytes:
    """A valid file: noise pixels in `mode`, `frames` frames where the format animates, an EXIF orientation
    (1-8) where it carries EXIF."""
    rng = np.random.default_rng(seed)
    pictures = []
    for _ in range(frames):
        picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        pictures.append(picture.convert("L").convert("I").convert("I;16") if mode == "I;16" else picture.convert(mode))
    options = {}
    if frames > 1 and fmt in ANIMATED:
        options.update(save_all=True, append_images=pictures[1:])
    if orientation != 1 and fmt in WITH_EXIF:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    out = io.BytesIO()
    pictures[0].save(out, fmt, **options)
    return out.getvalue()


def inflate_header(data: bytes, width: int, height: int) -> bytes:
    """The same bytes with the size fields of the header (PNG, GIF, BMP, baseline or progressive JPEG)
    rewritten to claim width x height; other formats unchanged."""
    data = bytearray(data)
    if data.startswith(b"\x89PNG") and len(data) >= 24:
        data[16:24] = struct.pack(">II", width, height)
    elif data.startswith(b"GIF") and len(data) >= 10:
        data[6:10] = struct.pack("<HH", min(width, 65535), min(height, 65535))
    elif data.startswith(b"BM") and len(data) >= 26:
        data[18:26] = struct.pack("<ii", min(width, 2**31 - 1), min(height, 2**31 - 1))
    elif data.startswith(b"\xff\xd8"):
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            at = data.find(marker)
            if at >= 0 and len(data) >= at + 9:
                data[at + 5:at + 9] = struct.pack(">HH", min(height, 65535), min(width, 65535))
                break
    return bytes(data)


def broken(data: bytes, how: str, rng: np.random.Generator) -> bytes:
    """One of BREAKS applied to a valid file, its details from `rng`."""
    if how == "truncated":
        return data[: int(rng.integers(0, len(data)))]
    if how == "overwritten":
        data = bytearray(data)
        for at in rng.integers(0, len(data), size=int(rng.integers(1, 9))):
            data[at] = int(rng.integers(0, 256))
        return bytes(data)
    if how == "inflated":
        side = [65535, 3000, 9000, 100_000][int(rng.integers(0, 4))]
        return inflate_header(data, side, side if rng.random() < 0.5 else int(rng.integers(1, 64)))
    if how == "junk":
        return MAGIC[int(rng.integers(0, len(MAGIC)))] + rng.bytes(int(rng.integers(0, 600)))
    return data


@st.composite
def hostile_files(draw, formats: tuple[str, ...] = tuple(MODES)) -> bytes:
    """A hypothesis strategy: an image file of one of `formats`, intact or broken."""
    fmt = draw(st.sampled_from(formats))
    data = image_file(
        fmt, draw(st.sampled_from(MODES[fmt])), draw(st.integers(1, 48)), draw(st.integers(1, 48)),
        frames=draw(st.integers(1, 3)) if fmt in ANIMATED else 1, orientation=draw(st.integers(1, 8)),
        seed=draw(st.integers(0, 2**16)),
    )
    return broken(data, draw(st.sampled_from(BREAKS)), np.random.default_rng(draw(st.integers(0, 2**32 - 1))))


def hostile_folder(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n files in `folder` (every format, intact and broken, a few empty), named by index and format."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    formats = sorted(MODES)
    for index in range(n):
        fmt = formats[index % len(formats)]
        mode = MODES[fmt][int(rng.integers(0, len(MODES[fmt])))]
        data = image_file(fmt, mode, int(rng.integers(1, 64)), int(rng.integers(1, 64)),
                          frames=int(rng.integers(1, 4)) if fmt in ANIMATED else 1,
                          orientation=int(rng.integers(1, 9)), seed=index)
        data = b"" if index % 17 == 16 else broken(data, BREAKS[index % len(BREAKS)], rng)
        path = folder / f"hostile_{index:03d}.{fmt.lower()}"
        path.write_bytes(data)
        paths.append(path)
    return paths


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "c3aeFUZZboundary") -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data body: (field name, content, file content type or None
    for a plain field)."""
    body = b""
    for name, content, content_type in parts:
        body += f"--{boundary}\r\n".encode()
        if content_type is None:
            body += f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        else:
            body += f'Content-Disposition: form-data; name="{name}"; filename="x"\r\nContent-Type: {content_type}\r\n\r\n'.encode()
        body += content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@st.composite
def api_requests(draw) -> tuple[str, dict]:
    """A hypothesis strategy: (what it is, keyword arguments of `requests.post` to /v1/age)."""
    files = hostile_files(("JPEG", "PNG", "WEBP", "GIF", "TIFF"))
    form = draw(st.sampled_from(["raw", "json", "json_wrong_types", "json_malformed", "base64_malformed", "multipart", "content_type"]))
    max_faces = draw(st.none() | JSON_VALUES)
    if form == "raw":
        return form, {"data": draw(files), "headers": {"Content-Type": draw(st.sampled_from(["image/jpeg", "image/png", "image/webp"]))},
                      "params": {} if max_faces is None else {"max_faces": str(max_faces)}}
    if form == "json":
        document = {"image": base64.b64encode(draw(files)).decode()}
        if draw(st.booleans()):
            document["image"] = "data:image/png;base64," + document["image"]
        if max_faces is not None:
            document["max_faces"] = max_faces
        return form, {"data": json.dumps(document).encode(), "headers": {"Content-Type": "application/json"}}
    if form == "json_wrong_types":
        document = draw(JSON_VALUES | st.fixed_dictionaries({"image": JSON_VALUES, "max_faces": JSON_VALUES}))
        return form, {"data": json.dumps(document).encode(), "headers": {"Content-Type": "application/json"}}
    if form == "json_malformed":
        return form, {"data": draw(st.binary(max_size=200)), "headers": {"Content-Type": "application/json"}}
    if form == "base64_malformed":
        text = base64.b64encode(draw(files)).decode()
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(alphabet="=%$ \n\u00e9-_", min_size=1, max_size=4)) + text[at:]
        return form, {"data": json.dumps({"image": text}).encode(), "headers": {"Content-Type": "application/json"}}
    if form == "multipart":
        field = st.tuples(
            st.sampled_from(["file", "max_faces", "photo", "file"]),
            st.binary(max_size=40) | files,
            st.none() | st.sampled_from(["image/jpeg", "image/png", "application/octet-stream", "text/plain", "image/gif"]),
        )
        body, content_type = multipart(draw(st.lists(field, max_size=4)))
        if draw(st.booleans()):  # cut short: the closing boundary missing
            body = body[: draw(st.integers(0, len(body)))]
        return form, {"data": body, "headers": {"Content-Type": content_type}}
    content_type = draw(st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=30))  # what a header may hold
    return form, {"data": draw(files), "headers": {"Content-Type": content_type}}
