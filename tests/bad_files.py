"""Broken inputs every reader of images must survive: built at test time, each with its expected reason."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but holds no pixels: a decompression bomb's header, a few bytes long."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_bad_files(folder: Path, good_jpeg: bytes) -> dict[str, str]:
    """Write one file per kind of bad input into `folder`; -> {file name: expected ImageError reason}."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "zero_byte.jpg": (b"", "empty"),
        "truncated.jpg": (good_jpeg[:200], "undecodable"),
        "corrupt.jpg": (good_jpeg[:20] + bytes(range(256)) * 8, "undecodable"),
        "not_an_image.jpg": (b"name,age\nsomebody,42\n", "undecodable"),
        "bomb.png": (png_header_only(100_000, 100_000), "too_large"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: reason for name, (_, reason) in files.items()}
