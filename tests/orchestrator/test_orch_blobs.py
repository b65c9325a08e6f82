from __future__ import annotations

import hashlib

import pytest

from dippy_studio.orchestrator.blobs import BlobStore


def test_put_is_content_addressed_and_idempotent(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    data = b"\x89PNG not really"
    sha = blobs.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert blobs.path(sha) == tmp_path / "blobs" / sha[:2] / sha[2:4] / sha
    assert blobs.exists(sha) and blobs.get(sha) == data
    assert blobs.put(data) == sha
    # No temporary files are left behind next to the blob.
    assert [p.name for p in blobs.path(sha).parent.iterdir()] == [sha]


def test_missing_and_malformed_names(tmp_path):
    blobs = BlobStore(tmp_path)
    absent = "0" * 64
    assert not blobs.exists(absent)
    with pytest.raises(FileNotFoundError):
        blobs.get(absent)
    for bad in ["../../etc/passwd", "A" * 64, "abc"]:
        with pytest.raises(ValueError):
            blobs.path(bad)
