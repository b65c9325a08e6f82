"""Hostile dataset archives, built in the test, and a measure of what refusing them costs in memory."""

from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from PIL import Image

from dippy_studio.engine.images import encode_png

MiB = 1 << 20
T = TypeVar("T")


def png(size: int = 32) -> bytes:
    return encode_png(Image.new("RGB", (size, size), (200, 30, 30)))


def amplifying_text(size: int) -> bytes:
    """Bytes that deflate about 70x: a little noise every 64 KiB, out of the reach of deflate's
    32 KiB window, keeps each entry under the archive's compression-ratio check."""
    noise = random.Random(size).randbytes(600)
    block = noise + b"a" * ((1 << 16) - len(noise))
    return block * (size // len(block))


def amplifying_zip(pairs: int, caption_bytes: int) -> bytes:
    """Small images, each captioned by `caption_bytes` of amplifying text."""
    caption = amplifying_text(caption_bytes)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for i in range(pairs):
            archive.writestr(f"img{i:02d}.png", png())
            archive.writestr(f"img{i:02d}.txt", caption)
    return buffer.getvalue()


def lying_zip(name: str, declared: bytes, hidden: bytes) -> bytes:
    """An archive with `a.png` and `a.txt` in which entry `name` holds `declared + hidden` but
    whose central directory declares only `declared` (with its CRC, so zipfile's own checks pass)."""
    files = {"a.png": png(), "a.txt": b"a red square"}
    files[name] = declared + hidden
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for entry, data in files.items():
            archive.writestr(entry, data)
    data = bytearray(buffer.getvalue())
    header = data.find(b"PK\x01\x02")
    while header != -1:
        (name_length,) = struct.unpack_from("<H", data, header + 28)
        if data[header + 46 : header + 46 + name_length] == name.encode():
            struct.pack_into("<I", data, header + 16, zlib.crc32(declared))
            struct.pack_into("<I", data, header + 24, len(declared))
            return bytes(data)
        header = data.find(b"PK\x01\x02", header + 4)
    raise AssertionError(f"no central directory entry for {name}")


def peak_rss_growth(action: Callable[[], T]) -> tuple[T, int]:
    """What `action` returned, and the bytes the process's peak resident memory rose by while it
    ran (Linux: VmHWM, reset first through /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("measuring peak memory needs Linux's /proc/self/clear_refs")
    before = _status_bytes("VmRSS")
    result = action()
    return result, _status_bytes("VmHWM") - before


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"/proc/self/status has no {field}")
