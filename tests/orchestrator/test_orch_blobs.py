"""The blob store's contract, on both backends: the filesystem and S3 (moto's server over HTTP).
A blob read from the bucket is checked against its name before it is used; two replicas with
their own data dirs share one bucket."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from dippy_studio.orchestrator.blobs import BlobStore, CorruptBlob, FileBlobStore, S3BlobStore, open_stores
from dippy_studio.orchestrator.cli import orchestrator_app
from dippy_studio.orchestrator.settings import OrchestratorSettings
from orchestrator.s3_kit import S3Server

Replica = Callable[[str], BlobStore]  # a store of this name, as a replica with its own data dir opens it


@pytest.fixture(params=["file", "s3"])
def replica(request: pytest.FixtureRequest, tmp_path: Path) -> Replica:
    if request.param == "file":
        return lambda name: open_stores(["results"], tmp_path / name)[0]
    s3: S3Server = request.getfixturevalue("s3")
    url = f"s3://{request.getfixturevalue('s3_bucket')}/some/prefix"
    return lambda name: open_stores(["results"], tmp_path / name, url, endpoint_url=s3.endpoint_url)[0]


def test_put_get_round_trip_is_content_addressed_and_idempotent(replica: Replica):
    blobs = replica("a")
    data = b"\x89PNG not really"
    sha = blobs.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert blobs.exists(sha) and blobs.get(sha) == data
    assert blobs.local_path(sha).read_bytes() == data
    assert blobs.put(data) == sha and blobs.get(sha) == data


def test_missing_and_malformed_names(replica: Replica):
    blobs = replica("a")
    absent = "0" * 64
    assert not blobs.exists(absent)
    with pytest.raises(FileNotFoundError):
        blobs.get(absent)
    with pytest.raises(FileNotFoundError):
        blobs.local_path(absent)
    for bad in ["../../etc/passwd", "A" * 64, "abc", "0" * 63 + "/"]:
        for use in (blobs.exists, blobs.get, blobs.local_path):
            with pytest.raises(ValueError, match="not a lower-case hex sha256"):
                use(bad)


def test_files_are_laid_out_by_hash_with_no_temporary_files_left(tmp_path: Path):
    blobs = FileBlobStore(tmp_path / "blobs")
    sha = blobs.put(b"abc")
    assert blobs.local_path(sha) == tmp_path / "blobs" / sha[:2] / sha[2:4] / sha
    blobs.put(b"abc")
    assert [p.name for p in blobs.local_path(sha).parent.iterdir()] == [sha]


def test_objects_are_keyed_by_prefix_store_and_hash_and_put_once(s3: S3Server, s3_bucket: str, tmp_path: Path):
    results, assets = open_stores(
        ["results", "assets"], tmp_path, f"s3://{s3_bucket}/p/q", endpoint_url=s3.endpoint_url
    )
    sha = results.put(b"an image")
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == [f"p/q/results/{sha[:2]}/{sha[2:4]}/{sha}"]
    assert not assets.exists(sha)  # stores of other names are apart

    # Another replica storing the same bytes finds them there and sends no second upload.
    other = open_stores(["results"], tmp_path / "other", f"s3://{s3_bucket}/p/q", endpoint_url=s3.endpoint_url)[0]
    assert isinstance(other, S3BlobStore)
    uploads: list[str] = []
    other.client.meta.events.register(
        "before-parameter-build.s3.PutObject", lambda **kw: uploads.append(kw["params"]["Key"])
    )
    assert other.put(b"an image") == sha
    assert uploads == []
    other.put(b"new bytes")
    assert len(uploads) == 1


def test_two_replicas_on_one_bucket_see_each_others_blobs(s3: S3Server, s3_bucket: str, tmp_path: Path):
    url = f"s3://{s3_bucket}/shared"
    a = open_stores(["results"], tmp_path / "a", url, endpoint_url=s3.endpoint_url)[0]
    b = open_stores(["results"], tmp_path / "b", url, endpoint_url=s3.endpoint_url)[0]
    from_a, from_b = a.put(b"written on a"), b.put(b"written on b")
    assert b.exists(from_a) and b.get(from_a) == b"written on a"
    assert a.exists(from_b) and a.get(from_b) == b"written on b"
    # Read through into the reader's own data dir, where code that needs a file gets it.
    assert b.local_path(from_a).is_relative_to(tmp_path / "b" / "blob-cache" / "results")


@pytest.mark.parametrize("tamper", [lambda data: b"X" + data[1:], lambda data: data[:-3]], ids=["altered", "truncated"])
def test_a_tampered_object_is_refused_on_read(s3: S3Server, s3_bucket: str, tmp_path: Path, tamper):
    url = f"s3://{s3_bucket}/blobs"
    writer = open_stores(["results"], tmp_path / "a", url, endpoint_url=s3.endpoint_url)[0]
    data = b"the miner's real image " * 100
    sha = writer.put(data)
    key = f"blobs/results/{sha[:2]}/{sha[2:4]}/{sha}"
    s3.client().put_object(Bucket=s3_bucket, Key=key, Body=tamper(data))

    reader = open_stores(["results"], tmp_path / "b", url, endpoint_url=s3.endpoint_url)[0]
    for read in (reader.get, reader.local_path):
        with pytest.raises(CorruptBlob, match=f"s3://{s3_bucket}/{key} hashes to [0-9a-f]{{64}}, not {sha}"):
            read(sha)
    # Nothing of it was kept: the next read asks the bucket again, and is refused again.
    assert not list((tmp_path / "b").rglob(sha)) and not list((tmp_path / "b").rglob(".tmp-*"))
    # The replica that wrote it still has its checked copy.
    assert writer.get(sha) == data


def test_a_bucket_that_cannot_be_used_fails_at_startup(s3: S3Server, tmp_path: Path, monkeypatch):
    with pytest.raises(ValueError, match="cannot use bucket 'no-such-bucket' at http://127.0.0.1"):
        open_stores(["results"], tmp_path, "s3://no-such-bucket/x", endpoint_url=s3.endpoint_url)
    monkeypatch.setenv("DIPPY_ORCH_BLOB_URL", "s3://no-such-bucket/x")
    monkeypatch.setenv("DIPPY_ORCH_S3_ENDPOINT_URL", s3.endpoint_url)
    result = CliRunner().invoke(orchestrator_app, ["serve", "--data-dir", str(tmp_path), "--dev-key", "//Alice"])
    assert result.exit_code == 2 and "cannot use bucket 'no-such-bucket'" in result.output, result.output


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DIPPY_ORCH_BLOB_URL": "/var/blobs"}, "blob_url must look like s3://bucket/prefix, not '/var/blobs'"),
        ({"DIPPY_ORCH_BLOB_URL": "gs://bucket/x"}, "blob_url must look like s3://bucket/prefix"),
        ({"DIPPY_ORCH_BLOB_URL": "s3://"}, "'' is not an S3 bucket name"),
        ({"DIPPY_ORCH_BLOB_URL": "s3://My_Bucket/x"}, "'My_Bucket' is not an S3 bucket name"),
        ({"DIPPY_ORCH_BLOB_URL": "s3://ab"}, "'ab' is not an S3 bucket name"),
        ({"DIPPY_ORCH_S3_ENDPOINT_URL": "http://minio:9000"}, "need blob_url"),
        (
            {"DIPPY_ORCH_BLOB_URL": "s3://bucket", "DIPPY_ORCH_S3_ENDPOINT_URL": "minio:9000"},
            "s3_endpoint_url must be an http:// or https:// URL",
        ),
    ],
)
def test_bad_blob_settings_fail_clearly(monkeypatch, tmp_path: Path, env: dict[str, str], message: str):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match="blob_url|s3_endpoint_url") as caught:
        OrchestratorSettings()
    assert message in str(caught.value)
    # The command line says the same and exits 2, before it serves anything.
    result = CliRunner().invoke(orchestrator_app, ["serve", "--data-dir", str(tmp_path), "--dev-key", "//Alice"])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_good_blob_settings(monkeypatch):
    monkeypatch.setenv("DIPPY_ORCH_BLOB_URL", "s3://dippy.blobs-1/prod/eu")
    monkeypatch.setenv("DIPPY_ORCH_S3_ENDPOINT_URL", "https://s3.example")
    settings = OrchestratorSettings()
    assert (settings.blob_url, settings.s3_endpoint_url) == ("s3://dippy.blobs-1/prod/eu", "https://s3.example")
    assert OrchestratorSettings.model_fields["blob_url"].default is None  # local disk unless configured


def test_the_read_through_cache_keeps_to_its_size_by_dropping_the_least_recently_used(
    s3: S3Server, s3_bucket: str, tmp_path: Path
):
    """A replica's disk holds at most `blob_cache_max_bytes` of cached blobs, in all its stores
    together; a blob dropped from the cache is still in the bucket and comes back when read."""
    url = f"s3://{s3_bucket}/bounded"
    results, assets = open_stores(["results", "assets"], tmp_path, url, s3.endpoint_url, cache_max_bytes=1000)
    cache = tmp_path / "blob-cache"

    def cached() -> set[str]:
        return {path.name for path in cache.rglob("*") if path.is_file()}

    def blob(i: int) -> bytes:
        return bytes([i]) * 350

    def then() -> None:
        time.sleep(0.05)  # file times tick every few milliseconds: keep the order of uses apart

    shas = []
    for i in range(3):
        shas.append(results.put(blob(i)))
        then()
    # 1050 bytes: over the limit, so the oldest went, down to 80% of it.
    assert cached() == {shas[1], shas[2]}
    # Reading a blob makes it the most recent: the next one out is the other, though written later.
    assert results.get(shas[1]) == blob(1)
    then()
    shas.append(assets.put(blob(3)))
    assert cached() == {shas[1], shas[3]}
    # Dropped from the disk, never from the bucket.
    for i, sha in enumerate(shas[:3]):
        assert results.get(sha) == blob(i)
    assert sum(path.stat().st_size for path in cache.rglob("*") if path.is_file()) <= 1000


def test_the_cache_limit_is_a_setting(monkeypatch):
    assert OrchestratorSettings().blob_cache_max_bytes == 10 << 30
    monkeypatch.setenv("DIPPY_ORCH_BLOB_CACHE_MAX_BYTES", "2000000000")
    assert OrchestratorSettings().blob_cache_max_bytes == 2_000_000_000
    monkeypatch.setenv("DIPPY_ORCH_BLOB_CACHE_MAX_BYTES", "100")
    with pytest.raises(ValidationError, match="blob_cache_max_bytes"):
        OrchestratorSettings()
