"""Training datasets: a folder or a .zip of images with same-name .txt captions.

This is the ai-toolkit/kohya convention: `cat_01.png` is captioned by `cat_01.txt`. A client
uploads such a dataset and a miner trains on it, so everything here treats the input as
hostile: archives are read in memory (nothing is extracted), and every limit is checked
before the bytes it guards are decompressed or decoded.

A `Dataset` is the validated content: images (still encoded) and captions, in name order,
with a sha256 over that canonical content, so the same data in a folder or a zip hashes
the same.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import re
import stat
import warnings
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from dippy_studio.engine.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
IMAGE_FORMATS = {"PNG", "JPEG", "WEBP"}
CAPTION_SUFFIX = ".txt"
TRIGGER_PLACEHOLDER = "[trigger]"
_SKIPPED_DIRS = {"__MACOSX"}
ZIP_DATE = (2026, 1, 1, 0, 0, 0)  # fixed entry timestamps keep archives byte-identical
_READ_CHUNK = 1 << 16


@dataclass(frozen=True)
class DatasetLimits:
    """What a dataset may hold. The defaults suit a local dataset; services pass their own total
    (`max_dataset_bytes` in the orchestrator's and the miner's settings); tests pass tiny limits."""

    max_files: int = 5000  # archive entries or folder files, of any kind
    # Everything read into memory (images and captions, uncompressed), and the archive itself.
    max_total_bytes: int = 2 * 1024**3
    # One image file: a 25-megapixel PNG of a photo is about 40 MB; more is padding or a bomb.
    max_image_bytes: int = 64 * 1024**2
    max_compression_ratio: float = 100.0
    # Small entries can compress well without being dangerous (a short repetitive caption).
    ratio_exempt_bytes: int = 64 * 1024
    min_side: int = 16
    max_pixels: int = 25_000_000
    # The text encoder reads a caption as at most 512 T5 tokens (the longest max_sequence_length
    # of any profile), about 2 KiB of English; the rest is cut off and never trained on. 4 KiB
    # leaves room for text that tokenizes densely (other scripts, punctuation, numbers).
    max_caption_bytes: int = 4 * 1024


@dataclass(frozen=True)
class DatasetItem:
    """One training image: its path inside the dataset, its encoded bytes and its caption."""

    name: str
    data: bytes
    caption: str | None
    width: int
    height: int

    def image(self) -> Image.Image:
        """The decoded image in RGB, upright (EXIF orientation applied), transparency over white."""
        with Image.open(io.BytesIO(self.data)) as opened:
            image = ImageOps.exif_transpose(opened)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, rgba)
            return image.convert("RGB")


@dataclass(frozen=True)
class Dataset:
    items: tuple[DatasetItem, ...]
    sha256: str
    source: str

    def __len__(self) -> int:
        return len(self.items)

    def captions(self, trigger: str | None = None) -> list[str]:
        """The training prompts: each caption with the trigger word applied."""
        return [apply_trigger(item.caption, trigger) for item in self.items]


def apply_trigger(caption: str | None, trigger: str | None) -> str:
    """Put the trigger word into a caption, ai-toolkit style.

    `[trigger]` is replaced by the word; a caption that lacks the word gets it prepended; a
    missing or empty caption becomes the word alone. Without a trigger word, `[trigger]` is
    dropped.
    """
    if caption is None or not caption.strip():
        return trigger or ""
    if trigger is None:
        return _tidy(caption.replace(TRIGGER_PLACEHOLDER, ""))
    if TRIGGER_PLACEHOLDER in caption:
        return _tidy(caption.replace(TRIGGER_PLACEHOLDER, trigger))
    if re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):
        return caption
    return f"{trigger}, {caption}"


def _tidy(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip(" ,;:")


def load_dataset(source: Path, limits: DatasetLimits | None = None, *, name: str | None = None) -> Dataset:
    """Read and check a dataset folder or .zip archive. `name` stands for `source` in errors."""
    limits = limits or DatasetLimits()
    label = name or str(source)
    if source.is_dir():
        return _build(_folder_files(source, limits, label), limits, label)
    if not source.is_file():
        raise DatasetError(f"dataset {label} does not exist")
    try:
        if source.stat().st_size > limits.max_total_bytes:
            raise DatasetError(f"{label}: the archive is larger than {limits.max_total_bytes} bytes")
        # Read from disk entry by entry: only what the dataset holds is ever in memory.
        return _load_zip(source, limits, label)
    except OSError as exc:
        raise DatasetError(f"cannot read {label}: {exc.strerror or exc}") from None


def load_zip_bytes(data: bytes, limits: DatasetLimits | None = None, source: str = "<zip>") -> Dataset:
    """Read and check a dataset from the bytes of a .zip archive (as uploaded), in memory."""
    limits = limits or DatasetLimits()
    if len(data) > limits.max_total_bytes:
        raise DatasetError(f"{source}: the archive is larger than {limits.max_total_bytes} bytes")
    return _load_zip(io.BytesIO(data), limits, source)


def _load_zip(archive_file: Path | BinaryIO, limits: DatasetLimits, source: str) -> Dataset:
    try:
        archive = zipfile.ZipFile(archive_file)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError) as exc:
        raise DatasetError(f"{source} is not a dataset folder or a readable .zip archive: {exc}") from None
    with archive:
        return _build(_zip_files(archive, limits, source), limits, source)


def _zip_files(archive: zipfile.ZipFile, limits: DatasetLimits, source: str) -> list[tuple[str, bytes]]:
    """Check the archive's directory, then read the images and their captions.

    Every bound is checked twice: against the sizes the directory declares, before anything is
    decompressed, and while reading, since a crafted archive can declare less than it holds.
    """
    infos = archive.infolist()
    if len(infos) > limits.max_files:
        raise DatasetError(f"{source}: {len(infos)} archive entries is over the limit of {limits.max_files}")
    entries: dict[str, zipfile.ZipInfo] = {}
    total = compressed = 0
    for info in infos:
        name = _safe_entry_name(info.filename, source)
        if info.is_dir():
            continue
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise DatasetError(f"{source}: archive entry {info.filename!r} is a symbolic link")
        if info.flag_bits & 0x1:
            raise DatasetError(f"{source}: archive entry {info.filename!r} is encrypted")
        if name in entries:
            raise DatasetError(f"{source}: archive entry {name!r} appears twice")
        ratio = info.file_size / max(1, info.compress_size)
        if info.file_size > limits.ratio_exempt_bytes and ratio > limits.max_compression_ratio:
            raise DatasetError(
                f"{source}: {info.filename!r} expands {ratio:.0f}x ({info.compress_size} -> {info.file_size} "
                f"bytes), over the {limits.max_compression_ratio:.0f}x limit (a zip bomb?)"
            )
        total += info.file_size
        compressed += info.compress_size
        entries[name] = info
    overall = total / max(1, compressed)
    if total > limits.ratio_exempt_bytes and overall > limits.max_compression_ratio:
        raise DatasetError(
            f"{source}: the archive expands {overall:.0f}x ({compressed} -> {total} bytes), "
            f"over the {limits.max_compression_ratio:.0f}x limit (a zip bomb?)"
        )
    wanted = _dataset_files(entries)
    _check_sizes({name: entries[name].file_size for name in wanted}, limits, source)
    return _strip_common_folder([(name, _read_entry(archive, entries[name], source)) for name in wanted])


def _check_sizes(sizes: dict[str, int], limits: DatasetLimits, source: str) -> None:
    """Each image and caption within its bound, and all of them within the dataset's total."""
    total = 0
    for name, size in sizes.items():
        if _is_caption(name) and size > limits.max_caption_bytes:
            raise DatasetError(
                f"{source}: caption {name!r} is {size} bytes, over the {limits.max_caption_bytes}-byte limit "
                "for a caption"
            )
        if _is_image(name) and size > limits.max_image_bytes:
            raise DatasetError(
                f"{source}: image {name!r} is {size} bytes, over the {limits.max_image_bytes}-byte limit for an image"
            )
        total += size
        if total > limits.max_total_bytes:
            raise DatasetError(
                f"{source}: the dataset's images and captions come to more than {limits.max_total_bytes} bytes "
                f"uncompressed (the limit was passed at {name!r})"
            )


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, source: str) -> bytes:
    """Decompress one entry in chunks, never more than one byte past its declared size (which was
    checked).

    zipfile stops at the declared size by itself and hides what lies beyond (with a forged CRC,
    silently). Told a chunk more (it decompresses a few KiB ahead and checks the CRC where it
    thinks the entry ends), it hands over the byte past the declared size of an entry that holds
    more, and still checks the CRC of one that ends where it says.
    """
    probe = copy.copy(info)
    probe.file_size = info.file_size + _READ_CHUNK
    chunks: list[bytes] = []
    size = 0
    try:
        with archive.open(probe) as member:
            while chunk := member.read(min(_READ_CHUNK, info.file_size + 1 - size)):
                size += len(chunk)
                if size > info.file_size:
                    raise DatasetError(
                        f"{source}: archive entry {info.filename!r} holds more than the {info.file_size} bytes "
                        "its directory declares (a zip bomb?)"
                    )
                chunks.append(chunk)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise DatasetError(f"{source}: archive entry {info.filename!r} is corrupt: {exc}") from None
    return b"".join(chunks)


def _dataset_files(names: Iterable[str]) -> list[str]:
    """The files a dataset is made of, in name order: images and the captions of images. Other
    files (a README.txt, a caption without its image, hidden files) are never read."""
    names = sorted(name for name in names if not _skipped(name))
    stems = {name.rsplit(".", 1)[0] for name in names if _is_image(name)}
    return [name for name in names if _is_image(name) or (_is_caption(name) and _caption_stem(name) in stems)]


def _safe_entry_name(raw: str, source: str) -> str:
    name = raw.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise DatasetError(f"{source}: archive entry {raw!r} has an absolute path")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise DatasetError(f"{source}: archive entry {raw!r} points outside the archive ('..')")
    if "\x00" in name:
        raise DatasetError(f"{source}: archive entry {raw!r} has a NUL byte in its name")
    return "/".join(p for p in parts if p not in ("", "."))


def _strip_common_folder(files: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """A zip of a folder usually holds `folder/...`: drop that one shared top-level folder."""
    tops = {name.split("/", 1)[0] for name, _ in files}
    if len(tops) == 1 and all("/" in name for name, _ in files):
        return [(name.split("/", 1)[1], data) for name, data in files]
    return files


def _folder_files(root: Path, limits: DatasetLimits, source: str) -> list[tuple[str, bytes]]:
    paths: dict[str, Path] = {}
    count = 0
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skipped(d))
        for filename in sorted(filenames):
            count += 1
            if count > limits.max_files:
                raise DatasetError(f"{source}: more than {limits.max_files} files in the dataset folder")
            path = Path(directory, filename)
            paths[path.relative_to(root).as_posix()] = path
    sizes: dict[str, int] = {}
    for name in _dataset_files(paths):
        try:
            info = paths[name].lstat()
        except OSError as exc:
            raise DatasetError(f"{source}: cannot read {name}: {exc.strerror}") from None
        if stat.S_ISLNK(info.st_mode):
            raise DatasetError(f"{source}: {name} is a symbolic link; a dataset holds plain files only")
        sizes[name] = info.st_size
    _check_sizes(sizes, limits, source)
    return [(name, _read_file(paths[name], sizes[name], source, name)) for name in sizes]


def _read_file(path: Path, size: int, source: str, name: str) -> bytes:
    """Read a file of a checked size; one that grew since is refused rather than read whole."""
    try:
        with path.open("rb") as file:
            data = file.read(size + 1)
    except OSError as exc:
        raise DatasetError(f"{source}: cannot read {name}: {exc.strerror}") from None
    if len(data) > size:
        raise DatasetError(f"{source}: {name} grew while it was being read")
    return data


def _skipped(name: str) -> bool:
    """Hidden files and macOS archive litter are not part of a dataset."""
    return any(part.startswith(".") or part in _SKIPPED_DIRS for part in name.split("/"))


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _is_caption(name: str) -> bool:
    return name.lower().endswith(CAPTION_SUFFIX)


def _caption_stem(name: str) -> str:
    return name[: -len(CAPTION_SUFFIX)]


def _build(files: Iterable[tuple[str, bytes]], limits: DatasetLimits, source: str) -> Dataset:
    by_name = dict(files)
    captions = {_caption_stem(name): (name, data) for name, data in by_name.items() if _is_caption(name)}
    items = []
    for name in sorted(by_name):
        if not _is_image(name):
            continue
        data = by_name[name]
        width, height = check_image(name, data, limits, source)
        stem = name.rsplit(".", 1)[0]
        caption = _decode_caption(*captions[stem], source) if stem in captions else None
        items.append(DatasetItem(name=name, data=data, caption=caption, width=width, height=height))
    if not items:
        kinds = ", ".join(IMAGE_SUFFIXES)
        raise DatasetError(f"{source}: no images found (looked for {kinds} files)")
    return Dataset(items=tuple(items), sha256=dataset_sha256(items), source=source)


def check_image(name: str, data: bytes, limits: DatasetLimits, source: str = "dataset") -> tuple[int, int]:
    """Check that `data` is a complete png/jpeg/webp image within the size limits; return its size."""
    try:
        with warnings.catch_warnings():
            # Our own pixel limit is lower than PIL's bomb warning threshold and checked first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in IMAGE_FORMATS:
                    raise DatasetError(f"{source}: {name} is a {image.format} image; use png, jpeg or webp")
                width, height = image.size
                if width * height > limits.max_pixels:
                    raise DatasetError(
                        f"{source}: {name} is {width}x{height}, over the limit of {limits.max_pixels} pixels"
                    )
                if min(width, height) < limits.min_side:
                    raise DatasetError(
                        f"{source}: {name} is {width}x{height}, too small (each side must be at least "
                        f"{limits.min_side} pixels)"
                    )
                image.load()  # decodes every pixel: truncated or corrupt data fails here
    except DatasetError:
        raise
    except Image.DecompressionBombError:
        raise DatasetError(f"{source}: {name} is over the limit of {limits.max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise DatasetError(f"{source}: {name} is not a readable image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DatasetError(f"{source}: {name} is a corrupt image: {exc}") from None
    return width, height


def _decode_caption(name: str, data: bytes, source: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{source}: caption {name} is not UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8"
        ) from None
    return re.sub(r"\s+", " ", text.removeprefix("\ufeff")).strip()


def dataset_sha256(items: Iterable[DatasetItem]) -> str:
    """sha256 over the ordered (name, image bytes, caption) triples, length-prefixed."""
    digest = hashlib.sha256()
    for item in items:
        for part in (
            item.name.encode(),
            item.data,
            b"\x00" if item.caption is None else b"\x01" + item.caption.encode(),
        ):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


@dataclass(frozen=True)
class DatasetSplit:
    """A dataset cut in two: what a trainer sees, and images it never sees, to evaluate on."""

    train: Dataset
    heldout: Dataset


def split_dataset(dataset: Dataset, share: float, min_images: int) -> DatasetSplit | None:
    """Hold out `share` of the images (rounded, at least one, never all), or None when the
    dataset has fewer than `min_images` images: too few to spare any for evaluation.

    Which images are held out depends on the content alone: images are ranked by
    sha256(dataset sha256, name) and the first ones held out. The same upload always splits the
    same way (a retry or another replica agrees), archive order and folder layout do not
    matter, and the pick is no pattern in the names a trainer could exploit. Captions stay with
    their images.
    """
    if not 0.0 <= share < 1.0:
        raise ValueError(f"the held-out share must be in [0, 1), got {share}")
    count = len(dataset.items)
    if share == 0.0 or count < max(2, min_images):
        return None
    heldout_count = min(count - 1, max(1, round(share * count)))
    ranked = sorted(
        dataset.items,
        key=lambda item: hashlib.sha256(f"{dataset.sha256}:{item.name}".encode()).hexdigest(),
    )
    heldout_names = {item.name for item in ranked[:heldout_count]}
    train = tuple(item for item in dataset.items if item.name not in heldout_names)
    heldout = tuple(item for item in dataset.items if item.name in heldout_names)
    return DatasetSplit(
        train=Dataset(train, dataset_sha256(train), f"{dataset.source} (training part)"),
        heldout=Dataset(heldout, dataset_sha256(heldout), f"{dataset.source} (held-out part)"),
    )


def dataset_zip(dataset: Dataset) -> bytes:
    """The dataset as a .zip in the kohya layout (each image with a same-name .txt caption when
    it has one), with fixed timestamps: the same content always gives the same bytes, so the
    archive's sha256 can name it. `load_zip_bytes` reads it back to the same `Dataset.sha256`.
    """
    files: dict[str, bytes] = {}
    for item in dataset.items:
        files[item.name] = item.data
        if item.caption is not None:
            # Images that share a stem (a.png, a.jpg) share one caption file, as when loaded.
            files[item.name.rsplit(".", 1)[0] + CAPTION_SUFFIX] = item.caption.encode()
    return zip_bytes(sorted(files.items()))


def zip_bytes(files: list[tuple[str, bytes]]) -> bytes:
    """A deflated zip of (name, data) entries in the given order, with fixed timestamps."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Scale the short side to `resolution` and crop the middle square, as the trainer sees it."""
    return ImageOps.fit(image, (resolution, resolution), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
