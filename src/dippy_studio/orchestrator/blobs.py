"""Content-addressed blob storage: a blob's name is the sha256 of its bytes.

Two backends behind one interface (`BlobStore`):

- `FileBlobStore`, the default: files under the data dir, `root/ab/cd/abcd…` (small directories).
  Writes go to a temporary file in the target directory, are fsynced and renamed into place, so a
  reader never sees a half-written blob and two processes storing the same bytes both succeed.
- `S3BlobStore`: S3-compatible object storage (`s3://bucket/prefix`), which replicas on several
  machines share; object key `prefix/<store>/ab/cd/<sha256>`. An S3 PUT is atomic. A blob read
  from the bucket is checked against its name before anyone uses it, and kept in a read-through
  `FileBlobStore` under this replica's data dir: content-addressed, so the cache is never stale.
  The caches of one replica share a size limit (`CacheBudget`): past it, the blobs read least
  recently are deleted from disk (never from the bucket) and fetched again if asked for.

Code that needs a file (a `FileResponse`, an engine loading a LoRA) asks `local_path`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# S3's rule for bucket names (lower case, so that they work as host names too).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CHUNK = 1 << 20
LOCAL_DIR = "blobs"  # data_dir/blobs/<store>: the filesystem backend
CACHE_DIR = "blob-cache"  # data_dir/blob-cache/<store>: the S3 backend's read-through cache


# What an operator whose replicas keep blobs on their own disks is told when one lacks a blob.
SHARE_ONE_STORE = "replicas on several machines must share one blob store (DIPPY_ORCH_BLOB_URL=s3://bucket/prefix)"


class MissingBlob(FileNotFoundError):
    """A blob this store does not hold. With replicas on several machines and no shared bucket,
    often one that another machine stored on its own disk."""


class CorruptBlob(Exception):
    """Stored bytes that do not hash to their name (tampered with or truncated): never served."""


def check_name(sha256: str) -> str:
    # The name becomes a path and a key: only accept a real hex digest, never `..` or separators.
    if not _SHA256.match(sha256):
        raise ValueError(f"not a lower-case hex sha256: {sha256!r}")
    return sha256


class BlobStore(ABC):
    """Blobs by sha256. `put` is idempotent. `get` and `local_path` raise MissingBlob (a
    FileNotFoundError) for a blob that is not stored, ValueError for a name that is not a
    sha256, CorruptBlob for bytes that do not match their name."""

    @abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abstractmethod
    def put(self, data: bytes) -> str:
        """Store `data` (idempotent) and return its sha256."""

    @abstractmethod
    def local_path(self, sha256: str) -> Path:
        """A local file with the blob's bytes, for code that needs a path. Read it, never write it."""

    def get(self, sha256: str) -> bytes:
        return self.local_path(sha256).read_bytes()


class FileBlobStore(BlobStore):
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def _file(self, sha256: str) -> Path:
        check_name(sha256)
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def exists(self, sha256: str) -> bool:
        return self._file(sha256).is_file()

    def local_path(self, sha256: str) -> Path:
        path = self._file(sha256)
        if not path.is_file():
            raise MissingBlob(f"no blob {sha256} in {self.root}")
        return path

    def put(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.exists(sha256):
            self.write(sha256, [data])
        return sha256

    def write(self, sha256: str, chunks: Iterable[bytes], source: str = "data") -> Path:
        """Store the concatenated `chunks` as blob `sha256` and return its file. CorruptBlob, and
        nothing stored, when they do not hash to that name."""
        target = self._file(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    f.write(chunk)
                if digest.hexdigest() != sha256:
                    raise CorruptBlob(f"{source} hashes to {digest.hexdigest()}, not {sha256}: refused")
                f.flush()
                # Durable before it becomes visible: a crash must not leave a truncated blob under a valid name.
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target


class CacheBudget:
    """A size limit shared by a replica's read-through caches. A blob's file time is when it was
    last stored or read (`touch`); once the caches hold more than `max_bytes`, the least recently
    used blobs are deleted until they hold `PRUNED_TO` of it, which leaves room for many writes
    before the next walk of the directories. Processes sharing a data dir each keep an estimate
    that every prune corrects from the disk."""

    PRUNED_TO = 0.8

    def __init__(self, max_bytes: int, roots: Sequence[Path]) -> None:
        self.max_bytes = max_bytes
        self.roots = list(roots)
        self._lock = threading.Lock()
        self._total: int | None = None  # unknown until the first write walks the caches

    def touch(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)

    def added(self, size: int) -> None:
        with self._lock:
            if self._total is None:
                self._total = sum(size for _, size, _ in self._files())
            else:
                self._total += size
            if self._total > self.max_bytes:
                self._total = self._prune()

    def _files(self) -> list[tuple[float, int, Path]]:
        found = []
        for root in self.roots:
            for path in root.glob("*/*/*"):
                if path.name.startswith(".tmp-"):
                    continue  # another thread's write in progress
                with contextlib.suppress(FileNotFoundError):  # pruned meanwhile by another process
                    stat = path.stat()
                    found.append((stat.st_mtime, stat.st_size, path))
        return found

    def _prune(self) -> int:
        files = sorted(self._files())
        total = sum(size for _, size, _ in files)
        for _, size, path in files:
            if total <= self.max_bytes * self.PRUNED_TO:
                break
            path.unlink(missing_ok=True)
            total -= size
        return total


class S3BlobStore(BlobStore):
    """Blobs in a bucket under `prefix`, read through `cache`. `client` is a boto3 S3 client
    (thread-safe; the stores of one orchestrator share it)."""

    def __init__(self, client: Any, bucket: str, prefix: str, cache: FileBlobStore, budget: CacheBudget) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.cache = cache
        self.budget = budget

    def _cached(self, sha256: str, chunks: Iterable[bytes], source: str = "data") -> Path:
        path = self.cache.write(sha256, chunks, source=source)
        self.budget.added(path.stat().st_size)
        return path

    def key(self, sha256: str) -> str:
        check_name(sha256)
        return "/".join(part for part in (self.prefix, sha256[:2], sha256[2:4], sha256) if part)

    def exists(self, sha256: str) -> bool:
        # Nothing deletes a blob, so one in the cache is in the bucket too.
        if self.cache.exists(sha256):
            return True
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))
        except ClientError as exc:
            if _missing(exc):
                return False
            raise
        return True

    def put(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.exists(sha256):
            self.client.put_object(Bucket=self.bucket, Key=self.key(sha256), Body=data)
            # Cached only once it is in the bucket: the cache must never know a blob the bucket lacks.
            self._cached(sha256, [data])
        return sha256

    def local_path(self, sha256: str) -> Path:
        key = self.key(sha256)
        with contextlib.suppress(FileNotFoundError):
            path = self.cache.local_path(sha256)
            self.budget.touch(path)
            return path
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except ClientError as exc:
            if _missing(exc):
                raise MissingBlob(f"no blob {sha256} at s3://{self.bucket}/{key}") from None
            raise
        with contextlib.closing(body):
            return self._cached(sha256, body.iter_chunks(_CHUNK), source=f"s3://{self.bucket}/{key}")


def _missing(exc: Any) -> bool:
    return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/prefix`; ValueError saying what is wrong otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise ValueError(f"blob_url must look like s3://bucket/prefix, not {url!r}")
    if not _BUCKET.match(parts.netloc):
        raise ValueError(
            f"blob_url {url!r}: {parts.netloc!r} is not an S3 bucket name "
            "(3 to 63 lower-case letters, digits, dots and hyphens)"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"blob_url {url!r}: no query or fragment, only s3://bucket/prefix")
    return parts.netloc, "/".join(part for part in parts.path.split("/") if part)


def open_stores(
    names: Sequence[str],
    data_dir: Path,
    url: str | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
    cache_max_bytes: int = 10 << 30,
) -> list[BlobStore]:
    """One store per name: on disk under data_dir/blobs/NAME without `url`; with an s3:// `url`,
    in its bucket under PREFIX/NAME, cached in data_dir/blob-cache/NAME (all the caches together
    at most `cache_max_bytes`, least recently used out first). Credentials come from
    boto3's default chain (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, an instance
    role). ValueError, at startup, when the bucket cannot be reached."""
    if url is None:
        return [FileBlobStore(data_dir / LOCAL_DIR / name) for name in names]
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_url(url)
    config = Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"},
        # Callbacks, downloads and audits use the client from many threads at once.
        max_pool_connections=64,
        # Self-hosted servers (MinIO, Ceph, moto) are addressed by path; AWS's own endpoints take both.
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
    try:
        client.head_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError) as exc:
        where = f" at {endpoint_url}" if endpoint_url else ""
        raise ValueError(f"cannot use bucket {bucket!r}{where} for blobs: {exc}") from None
    budget = CacheBudget(cache_max_bytes, [data_dir / CACHE_DIR / name for name in names])
    stores: list[BlobStore] = []
    for name, root in zip(names, budget.roots, strict=True):
        key_prefix = f"{prefix}/{name}" if prefix else name
        stores.append(S3BlobStore(client, bucket, key_prefix, FileBlobStore(root), budget))
    return stores
