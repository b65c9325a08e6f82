"""Content-addressed blob storage on the filesystem: a blob's name is the sha256 of its bytes.

Layout `root/ab/cd/abcd…` keeps directories small. Writes go to a temporary file in the target
directory and are renamed into place, so a reader never sees a half-written blob and two
processes storing the same bytes both succeed with the same result.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BlobStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        # The name becomes a path: only accept a real hex digest, never `..` or separators.
        if not _SHA256.match(sha256):
            raise ValueError(f"not a lower-case hex sha256: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def get(self, sha256: str) -> bytes:
        """The blob's bytes; FileNotFoundError when it is not stored."""
        return self.path(sha256).read_bytes()

    def put(self, data: bytes) -> str:
        """Store `data` (idempotent) and return its sha256."""
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.exists(sha256):
            self._write(sha256, data)
        return sha256

    def _write(self, sha256: str, data: bytes) -> None:
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                # Durable before it becomes visible: a crash must not leave a truncated blob under a valid name.
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
