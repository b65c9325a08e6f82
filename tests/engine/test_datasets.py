"""Dataset loading: the kohya/ai-toolkit folder or zip convention, and every check on hostile input."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from dippy_studio.engine.datasets import (
    DatasetLimits,
    apply_trigger,
    load_dataset,
    load_zip_bytes,
    resize_center_crop,
)
from dippy_studio.engine.errors import DatasetError
from dippy_studio.engine.images import encode_png
from dippy_studio.engine.synthetic_data import write_dataset, zip_bytes
from zip_bombs import MiB, amplifying_text, amplifying_zip, lying_zip, peak_rss_growth


def png(size: tuple[int, int] = (32, 32), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    return encode_png(Image.new("RGB", size, colour))


def image_bytes(fmt: str, size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, format=fmt)
    return buffer.getvalue()


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def folder_files(root: Path) -> list[tuple[str, bytes]]:
    return [(p.relative_to(root).as_posix(), p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()]


def test_folder_and_zip_of_the_same_data_hash_the_same(tmp_path):
    folder = write_dataset(tmp_path / "shapes", "sunset", count=3, seed=0, size=32)
    from_folder = load_dataset(folder)
    files = folder_files(folder)
    archive = tmp_path / "shapes.zip"
    archive.write_bytes(zip_bytes(files))
    nested = tmp_path / "nested.zip"  # a zip of the folder itself: shapes/...
    nested.write_bytes(zip_bytes([(f"shapes/{name}", data) for name, data in reversed(files)]))

    assert len(from_folder) == 3
    assert [item.name for item in from_folder.items] == ["sunset_0000.png", "sunset_0001.png", "sunset_0002.png"]
    assert load_dataset(archive).sha256 == from_folder.sha256
    assert load_dataset(nested).sha256 == from_folder.sha256
    assert load_zip_bytes(archive.read_bytes()).sha256 == from_folder.sha256


def test_stored_and_deflated_archives_read_the_same(tmp_path):
    files = folder_files(write_dataset(tmp_path / "shapes", "sunset", count=3, seed=0, size=32))
    stored = io.BytesIO()
    with zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files:
            archive.writestr(name, data)
    assert load_zip_bytes(stored.getvalue()).sha256 == load_zip_bytes(zip_bytes(files)).sha256


def test_hash_changes_with_any_caption_or_pixel(tmp_path):
    base = load_dataset(write_files(tmp_path / "a", {"x.png": png(), "x.txt": b"a red square"})).sha256
    caption = load_dataset(write_files(tmp_path / "b", {"x.png": png(), "x.txt": b"a red box"})).sha256
    pixels = load_dataset(write_files(tmp_path / "c", {"x.png": png(colour=(201, 30, 30)), "x.txt": b"a red square"}))
    no_caption = load_dataset(write_files(tmp_path / "d", {"x.png": png()})).sha256
    assert len({base, caption, pixels.sha256, no_caption}) == 4


def test_synthetic_datasets_are_reproducible(tmp_path):
    first = write_dataset(tmp_path / "one.zip", "meadow", count=4, seed=3)
    second = write_dataset(tmp_path / "two.zip", "meadow", count=4, seed=3)
    other = write_dataset(tmp_path / "three.zip", "meadow", count=4, seed=4)
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()


@pytest.mark.parametrize(
    ("caption", "trigger", "expected"),
    [
        ("a photo of [trigger] at the beach", "ohwx", "a photo of ohwx at the beach"),
        ("a photo at the beach", "ohwx", "ohwx, a photo at the beach"),
        ("ohwx at the beach", "ohwx", "ohwx at the beach"),
        ("ohwxy at the beach", "ohwx", "ohwx, ohwxy at the beach"),
        (None, "ohwx", "ohwx"),
        ("   ", "ohwx", "ohwx"),
        ("[trigger] a red circle", None, "a red circle"),
        ("a red circle", None, "a red circle"),
        (None, None, ""),
    ],
)
def test_trigger_word(caption, trigger, expected):
    assert apply_trigger(caption, trigger) == expected


def test_formats_captions_and_images_without_captions(tmp_path):
    folder = write_files(
        tmp_path / "ds",
        {
            "a.png": png(),
            "a.txt": "\ufeff[trigger] in a café\n".encode(),
            "b.jpg": image_bytes("JPEG"),
            "c.webp": image_bytes("WEBP"),
            "c.txt": b"a blue square",
            "notes.md": b"ignored",
            ".DS_Store": b"\x00\x01",
        },
    )
    dataset = load_dataset(folder)
    assert [item.name for item in dataset.items] == ["a.png", "b.jpg", "c.webp"]
    assert dataset.captions("sks") == ["sks in a café", "sks", "sks, a blue square"]
    assert [item.image().size for item in dataset.items] == [(32, 32)] * 3


def test_preprocessing_resizes_and_center_crops():
    wide = Image.new("RGB", (128, 64), (0, 0, 255))
    wide.paste((255, 0, 0), (32, 0, 96, 64))  # a red middle square between blue margins
    cropped = resize_center_crop(wide, 32)
    assert cropped.size == (32, 32)
    assert cropped.getpixel((1, 16))[0] > 200 and cropped.getpixel((30, 16))[0] > 200  # margins cropped away


def test_transparent_images_are_flattened_onto_white(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(buffer, format="PNG")
    dataset = load_dataset(write_files(tmp_path / "ds", {"clear.png": buffer.getvalue()}))
    assert dataset.items[0].image().getpixel((5, 5)) == (255, 255, 255)


# --- every check has a crafted bad input --------------------------------------------------------


def expect_error(match: str, source: Path, **limits) -> None:
    with pytest.raises(DatasetError, match=match):
        load_dataset(source, DatasetLimits(**limits) if limits else None)


def test_missing_dataset(tmp_path):
    expect_error("does not exist", tmp_path / "nowhere")


def test_no_images(tmp_path):
    expect_error("no images found", write_files(tmp_path / "ds", {"a.txt": b"caption without an image"}))
    empty = tmp_path / "empty.zip"
    empty.write_bytes(zip_bytes([]))
    expect_error("no images found", empty)


def test_unreadable_image(tmp_path):
    expect_error("b.png is not a readable image", write_files(tmp_path / "ds", {"a.png": png(), "b.png": b"hello"}))


def test_corrupt_image(tmp_path):
    truncated = png((64, 64))[:-40]
    expect_error("a.png is a corrupt image", write_files(tmp_path / "ds", {"a.png": truncated}))


def test_unsupported_image_format(tmp_path):
    expect_error("is a GIF image", write_files(tmp_path / "ds", {"a.png": image_bytes("GIF")}))


def test_image_too_small(tmp_path):
    expect_error("too small", write_files(tmp_path / "ds", {"a.png": png((8, 40))}), min_side=16)


def test_image_too_large(tmp_path):
    expect_error(
        "over the limit of 1000 pixels", write_files(tmp_path / "ds", {"a.png": png((40, 40))}), max_pixels=1000
    )


def test_caption_not_utf8(tmp_path):
    folder = write_files(tmp_path / "ds", {"a.png": png(), "a.txt": "une île".encode("latin-1")})
    expect_error("caption a.txt is not UTF-8", folder)


def test_caption_too_long(tmp_path):
    folder = write_files(tmp_path / "ds", {"a.png": png(), "a.txt": b"x" * 11})
    expect_error("caption 'a.txt' is 11 bytes, over the 10-byte limit for a caption", folder, max_caption_bytes=10)
    archive = tmp_path / "ds.zip"
    archive.write_bytes(zip_bytes(folder_files(folder)))
    expect_error("caption 'a.txt' is 11 bytes, over the 10-byte limit", archive, max_caption_bytes=10)


def test_the_default_caption_limit_fits_what_the_text_encoder_reads(tmp_path):
    """512 T5 tokens of English (the longest any profile reads) is about 2 KiB: such a caption
    is kept whole; one twice the default limit is refused."""
    long_caption = ("a photo of a red square on a plain white background, " * 60)[:3000]
    folder = write_files(tmp_path / "ds", {"a.png": png(), "a.txt": long_caption.encode()})
    assert load_dataset(folder).items[0].caption == long_caption.strip()
    (folder / "a.txt").write_bytes(b"x" * 2 * DatasetLimits().max_caption_bytes)
    expect_error("caption 'a.txt' is 8192 bytes, over the 4096-byte limit", folder)


def test_files_that_are_not_part_of_the_dataset_are_never_read(tmp_path):
    """A README or a caption without its image may be any size: only images and their captions count."""
    files = {"a.png": png(), "a.txt": b"a red square", "README.txt": b"x" * 5000, "orphan.txt": b"y" * 5000}
    folder = write_files(tmp_path / "ds", files)
    archive = tmp_path / "ds.zip"
    archive.write_bytes(zip_bytes(folder_files(folder)))
    for source in (folder, archive):
        dataset = load_dataset(source, DatasetLimits(max_caption_bytes=100))
        assert [(item.name, item.caption) for item in dataset.items] == [("a.png", "a red square")]


def test_too_many_files_in_a_folder(tmp_path):
    folder = write_files(tmp_path / "ds", {f"{i}.png": png() for i in range(4)})
    expect_error("more than 3 files", folder, max_files=3)


def test_too_many_files_in_a_zip(tmp_path):
    archive = tmp_path / "ds.zip"
    archive.write_bytes(zip_bytes([(f"{i}.png", png()) for i in range(4)]))
    expect_error("4 archive entries is over the limit of 3", archive, max_files=3)


def test_absolute_paths_in_a_zip(tmp_path):
    archive = tmp_path / "abs.zip"
    archive.write_bytes(zip_bytes([("ok.png", png()), ("/etc/evil.png", png())]))
    expect_error("has an absolute path", archive)
    windows = tmp_path / "drive.zip"
    windows.write_bytes(zip_bytes([("C:\\evil.png", png())]))
    expect_error("has an absolute path", windows)


def test_parent_directory_entries_in_a_zip(tmp_path):
    archive = tmp_path / "dotdot.zip"
    archive.write_bytes(zip_bytes([("ok.png", png()), ("imgs/../../evil.png", png())]))
    expect_error(r"points outside the archive \('\.\.'\)", archive)


def test_symlinks_in_a_zip(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("ok.png", png())
        link = zipfile.ZipInfo("link.png")
        link.external_attr = (0o120777 << 16) | 0x20
        archive.writestr(link, "/etc/passwd")
    path = tmp_path / "link.zip"
    path.write_bytes(buffer.getvalue())
    expect_error("is a symbolic link", path)


def test_zip_bomb_compression_ratio(tmp_path):
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(zip_bytes([("ok.png", png()), ("bomb.txt", b"\x00" * 300_000)]))
    expect_error(r"bomb.txt' expands \d+x .* over the 100x limit \(a zip bomb\?\)", archive, max_compression_ratio=100)


def uncompressed_png(side: int) -> bytes:
    """A PNG stored without compression, so that it deflates well in a zip."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (10, 120, 200)).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def test_the_total_uncompressed_size_is_bounded(tmp_path):
    image = uncompressed_png(100)  # about 30 KB, under the ratio check's floor
    archive = tmp_path / "big.zip"
    archive.write_bytes(zip_bytes([(f"{i}.png", image) for i in range(4)]))
    total = 4 * len(image)
    assert archive.stat().st_size < total // 10  # the archive is well under the limit; its content is not
    expect_error(
        rf"come to more than {total - 1} bytes uncompressed \(the limit was passed at '3.png'\)",
        archive,
        max_total_bytes=total - 1,
    )
    assert len(load_dataset(archive, DatasetLimits(max_total_bytes=total))) == 4
    folder = write_files(tmp_path / "ds", {f"{i}.png": image for i in range(4)})
    expect_error(f"come to more than {total - 1} bytes", folder, max_total_bytes=total - 1)
    assert len(load_dataset(folder, DatasetLimits(max_total_bytes=total))) == 4


def test_image_too_large_in_bytes(tmp_path):
    image = png() + b"\x00" * 2000  # trailing bytes after the PNG's end: still a readable image
    folder = write_files(tmp_path / "ds", {"a.png": image})
    expect_error(
        f"image 'a.png' is {len(image)} bytes, over the 1000-byte limit for an image", folder, max_image_bytes=1000
    )
    archive = tmp_path / "ds.zip"
    archive.write_bytes(zip_bytes([("a.png", image)]))
    expect_error(f"image 'a.png' is {len(image)} bytes, over the 1000-byte limit", archive, max_image_bytes=1000)


def with_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose header claims another size (with a valid checksum): a pixel bomb's header."""
    header = bytearray(data)
    struct.pack_into(">II", header, 16, width, height)
    struct.pack_into(">I", header, 29, zlib.crc32(bytes(header[12:29])))
    return bytes(header)


@pytest.mark.parametrize("side", [10_000, 50_000])  # over our limit; over PIL's own bomb guard too
def test_pixel_bombs_are_refused_from_the_header(tmp_path, side):
    folder = write_files(tmp_path / "ds", {"a.png": with_size(png(), side, side)})
    expect_error(rf"a.png is ({side}x{side}, )?over the limit of 25000000 pixels", folder)


def test_archive_file_too_large(tmp_path):
    archive = tmp_path / "big.zip"
    archive.write_bytes(zip_bytes([(f"{i}.png", png()) for i in range(5)]))
    assert archive.stat().st_size > 300
    expect_error("the archive is larger than 300 bytes", archive, max_total_bytes=300)


def test_amplifying_captions_are_refused_before_they_are_unpacked(tmp_path):
    """Captions of 24 MiB that deflate ~70x (under the ratio check): refused from the archive's
    directory, naming the caption, without the process growing by what they unpack to."""
    data = amplifying_zip(pairs=8, caption_bytes=24 * MiB)
    assert len(data) < 4 * MiB
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(data)
    message = "caption 'img00.txt' is 25165824 bytes, over the 4096-byte limit for a caption"

    def refuse() -> None:
        with pytest.raises(DatasetError, match=message):
            load_zip_bytes(data, source="the dataset")
        with pytest.raises(DatasetError, match=message):
            load_dataset(archive)

    _, growth = peak_rss_growth(refuse)
    assert growth < 50 * MiB, f"grew by {growth / MiB:.0f} MiB"


@pytest.mark.parametrize(
    ("entry", "declared"), [("a.txt", b"a red square"), ("a.png", png())], ids=["caption", "image"]
)
def test_entries_that_hold_more_than_the_directory_declares_are_refused(tmp_path, entry, declared):
    """The directory (with a matching CRC) declares a small entry that really unpacks to 24 MiB."""
    archive = tmp_path / "lying.zip"
    archive.write_bytes(lying_zip(entry, declared, amplifying_text(24 * MiB)))
    with zipfile.ZipFile(archive) as opened:
        assert opened.getinfo(entry).file_size == len(declared)  # what the directory says
    message = rf"'{entry}' holds more than the {len(declared)} bytes its directory declares"

    def refuse() -> None:
        with pytest.raises(DatasetError, match=message):
            load_dataset(archive)

    _, growth = peak_rss_growth(refuse)
    assert growth < 50 * MiB, f"grew by {growth / MiB:.0f} MiB"


def test_not_a_zip(tmp_path):
    path = tmp_path / "data.zip"
    path.write_bytes(b"this is not an archive")
    expect_error("not a dataset folder or a readable .zip", path)


def test_corrupt_zip_member(tmp_path):
    data = bytearray(zip_bytes([("a.png", png((64, 64)))]))
    start = data.index(b"a.png") + len("a.png")
    data[start + 10 : start + 40] = b"\xff" * 30  # damage the deflated stream
    path = tmp_path / "damaged.zip"
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="corrupt"):
        load_dataset(path)
