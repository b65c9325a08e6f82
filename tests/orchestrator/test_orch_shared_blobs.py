"""Two orchestrator replicas, as on two machines: separate data dirs, one PostgreSQL database, one
S3 bucket (moto's server over HTTP). A request submitted to one is dispatched and completed there,
and its result is downloaded from the other with the miner's exact bytes; a result whose object was
tampered with in the bucket is refused, not served.

Real processes: `dippy-studio orchestrator serve` twice and fake miners (bench/fake_miners.py:
signed protocol, no engine, a unique PNG per job that the test recomputes).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dippy_studio.orchestrator.db import upgrade
from dippy_studio.orchestrator.store import Store
from localnet_kit import wait_until
from orchestrator.process_kit import FakeMiners, OrchestratorProcess, fake_miners, register, tail
from orchestrator.s3_kit import S3Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ORCHESTRATOR_URI = "//shared/orchestrator"
ORCHESTRATOR_ENV = {
    "DIPPY_ORCH_AUDIT": "false",
    "DIPPY_ORCH_PROBE_INTERVAL_S": "0.5",
    "DIPPY_ORCH_SYNC_INTERVAL_S": "1",
}


def generate(http: httpx.Client, prompt: str) -> dict[str, Any]:
    """Submit an image request and wait for it; its view once it succeeded."""
    body = {"prompt": prompt, "seed": 7, "width": 64, "height": 64}
    reply = http.post("/v1/images", json=body, headers={"Prefer": "wait=30"})
    assert reply.status_code == 200 and reply.json()["status"] == "succeeded", reply.text
    return reply.json()


def miners_png(view: dict[str, Any]) -> bytes:
    """The PNG the fake miner made for this request's last attempt."""
    return fake_miners.unique_png(64, 64, f"{view['request_id']}-{view['attempts']}")


def up(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    return False


@contextlib.contextmanager
def two_replicas(
    tmp_path: Path, db_url: str, env: dict[str, str], miners: int
) -> Iterator[tuple[OrchestratorProcess, OrchestratorProcess, dict[str, str], contextlib.ExitStack]]:
    """Replicas A and B (not started) on one migrated database, `miners` fake miners on the
    chain and an API key's headers; everything is stopped on exit, and each replica's
    log tail printed (pytest shows it when the test fails)."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "chain").mkdir()
    upgrade(db_url)
    a = OrchestratorProcess(tmp_path, db_url, ORCHESTRATOR_URI, env, name="replica-a")
    b = OrchestratorProcess(tmp_path, db_url, ORCHESTRATOR_URI, env, name="replica-b")
    with contextlib.ExitStack() as cleanup:
        fakes = FakeMiners("//shared/miner", miners, tmp_path / "logs" / "miners.log", ORCHESTRATOR_URI)
        cleanup.callback(fakes.stop)
        register(tmp_path / "chain", fakes.listening())
        store = Store.open(db_url, migrate=False)
        cleanup.callback(store.close)
        headers = {"Authorization": f"Bearer {store.create_api_key('client').secret}"}
        for replica in (a, b):
            cleanup.callback(replica.kill)
            cleanup.callback(lambda replica=replica: print(tail(replica.log, 40)))
        yield a, b, headers, cleanup


def test_a_result_completed_on_one_replica_is_downloaded_from_another(
    tmp_path: Path, pg_databases: Callable[[], str], s3: S3Server, s3_bucket: str
) -> None:
    env = {**ORCHESTRATOR_ENV, **s3.env(s3_bucket, "prod")}
    with two_replicas(tmp_path, pg_databases(), env, miners=2) as (a, b, headers, cleanup):
        # Replica A alone: whatever it completes, B has never seen.
        a.start()
        wait_until(lambda: a.healthy_miners() == 2, 60, "replica A to see 2 healthy miners")
        on_a = cleanup.enter_context(httpx.Client(base_url=a.url, headers=headers, timeout=30))
        kept, tampered = generate(on_a, "a lighthouse"), generate(on_a, "a harbour")
        assert base64.b64decode(kept["result"]["data_base64"]) == miners_png(kept)

        b.start()
        wait_until(lambda: up(b.url), 60, "replica B to answer")
        on_b = cleanup.enter_context(httpx.Client(base_url=b.url, headers=headers, timeout=30))

        download = on_b.get(f"/v1/requests/{kept['request_id']}/result")
        assert download.status_code == 200, download.text
        assert download.content == miners_png(kept)
        assert download.headers["X-Result-Sha256"] == hashlib.sha256(download.content).hexdigest()
        assert download.headers["X-Result-Sha256"] == kept["result"]["sha256"]
        # B read it from the bucket into its own cache; neither replica keeps blobs of its own on disk.
        assert list((b.data_dir / "blob-cache" / "results").rglob(kept["result"]["sha256"]))
        assert not (a.data_dir / "blobs").exists() and not (b.data_dir / "blobs").exists()

        sha = tampered["result"]["sha256"]
        s3.client().put_object(Bucket=s3_bucket, Key=f"prod/results/{sha[:2]}/{sha[2:4]}/{sha}", Body=b"not it")
        refused = on_b.get(f"/v1/requests/{tampered['request_id']}/result")
        assert refused.status_code == 502, refused.text
        assert "failed its sha256 check" in refused.json()["detail"]
        assert on_a.get(f"/v1/requests/{tampered['request_id']}/result").content == miners_png(tampered)  # A's copy

        # And the other way round, with both replicas serving.
        wait_until(lambda: b.healthy_miners() == 2, 60, "replica B to see 2 healthy miners")
        later = generate(on_b, "a quay at night")
        download = on_a.get(f"/v1/requests/{later['request_id']}/result")
        assert download.status_code == 200 and download.content == miners_png(later)


def test_replicas_without_a_shared_store_say_so_instead_of_failing(
    tmp_path: Path, pg_databases: Callable[[], str]
) -> None:
    """A deployment fault: two machines, one database, each replica's blobs on its own disk. The
    replica that did not take a result's callback answers 503 with what to configure, not 500."""
    operator = {"Authorization": "Bearer operator-token-0123456789"}
    env = {**ORCHESTRATOR_ENV, "DIPPY_ORCH_DASHBOARD_TOKEN": operator["Authorization"].removeprefix("Bearer ")}
    with two_replicas(tmp_path, pg_databases(), env, miners=1) as (a, b, headers, cleanup):
        a.start()
        wait_until(lambda: a.healthy_miners() == 1, 60, "replica A to see its miner")
        on_a = cleanup.enter_context(httpx.Client(base_url=a.url, headers=headers, timeout=30))
        alone = generate(on_a, "a lighthouse")  # A alone: the result is on A's disk only

        b.start()
        wait_until(lambda: b.healthy_miners() == 1, 60, "replica B to see the miner")
        on_b = cleanup.enter_context(httpx.Client(base_url=b.url, headers=headers, timeout=30))
        refused = on_b.get(f"/v1/requests/{alone['request_id']}/result")
        assert refused.status_code == 503, refused.text
        assert "replicas on several machines must share one blob store (DIPPY_ORCH_BLOB_URL" in refused.json()["detail"]
        assert on_a.get(f"/v1/requests/{alone['request_id']}/result").content == miners_png(alone)
        # The operator's dashboard gallery on B says the same.
        image = on_b.get(f"/dashboard/images/{alone['request_id']}.png", headers=operator)
        assert image.status_code == 503 and "DIPPY_ORCH_BLOB_URL" in image.json()["detail"]
        assert on_a.get(f"/dashboard/images/{alone['request_id']}.png", headers=operator).content == miners_png(alone)

        # Both up: either replica may dispatch a job and take its callback. A client that waits on
        # the other one gets the request's view without the inline image (never a 500, and it still
        # learns the request id); exactly one replica serves each result, the other says why not.
        for i, client in enumerate([on_a, on_b] * 3):
            body = {"prompt": f"a harbour {i}", "seed": 7, "width": 64, "height": 64}
            view = client.post("/v1/images", json=body, headers={"Prefer": "wait=30"}).json()
            assert view["status"] == "succeeded", view
            answers = [replica.get(f"/v1/requests/{view['request_id']}/result") for replica in (on_a, on_b)]
            assert sorted(answer.status_code for answer in answers) == [200, 503]
            served = next(answer.content for answer in answers if answer.status_code == 200)
            assert served == miners_png(view)
            if view["result"]["data_base64"] is not None:
                assert base64.b64decode(view["result"]["data_base64"]) == served
            else:
                assert answers[client is on_b].status_code == 503  # the replica asked could not read it
        assert "Traceback" not in a.log.read_text() + b.log.read_text()
