"""Live status for builders: cursor paging, /v1/models, the status after a `Prefer: wait` that
times out, miners' signed progress reports, and the server-sent event stream of a request."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import orchestrator.orch_kit as kit
from dippy_studio.orchestrator.paging import encode_cursor
from dippy_studio.protocol import signer_from_uri
from dippy_studio.protocol.auth import sign_request
from dippy_studio.protocol.limits import profile_limits
from orchestrator.orch_kit import ORCHESTRATOR, dataset_zip, image_body, wait_status, wait_until

subnet = kit.subnet  # fixture: a local chain, miners and orchestrators


def events(client: httpx.Client, request_id: str) -> Iterator[tuple[str, Any]]:
    """The (event, data) pairs of a request's event stream, as they arrive, until it ends."""
    with client.stream("GET", f"/v1/requests/{request_id}/events", timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        event, data = None, []
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data.append(line.removeprefix("data:").strip())
            elif not line and data:
                yield event or "message", json.loads("\n".join(data))
                event, data = None, []


# ---- paging and models -------------------------------------------------------------------------


def test_pages_walk_every_request_once_while_new_ones_arrive(subnet, db_url):
    orch = subnet.start_orchestrator(db_url=db_url)
    client = subnet.client(orch, subnet.new_key(orch))
    first = [client.post("/v1/images", json=image_body()).json()["request_id"] for _ in range(25)]
    seen: list[str] = []
    url: str | None = "/v1/requests?limit=10"
    pages = 0
    while url is not None:
        page = client.get(url)
        assert page.status_code == 200, page.text
        assert isinstance(page.json(), list)
        seen += [r["request_id"] for r in page.json()]
        pages += 1
        # Newer requests arrive between pages: they sort before the pages already handed out.
        client.post("/v1/images", json=image_body())
        cursor = page.headers.get("x-next-cursor")
        if cursor is None:
            assert "link" not in page.headers
            url = None
        else:
            assert page.headers["link"].endswith('; rel="next"') and f"cursor={cursor}" in page.headers["link"]
            url = page.headers["link"].split(">")[0].lstrip("<")
    assert pages == 3
    assert seen == first[::-1]  # newest first, no repeats, no gaps


def test_a_bad_cursor_is_refused_with_a_reason(subnet):
    orch = subnet.start_orchestrator()
    client = subnet.client(orch, subnet.new_key(orch))
    for path in ("/v1/requests", "/v1/loras"):
        # Times whose offset carries them past the years a datetime holds, and an id with a NUL
        # (PostgreSQL takes none): cursors we never handed out, not crashes.
        odd = [["0001-01-01T00:00:00+14:00", "req_1"], ["9999-12-31T23:59:59-14:00", "req_1"]]
        odd.append(["2030-01-01T00:00:00+00:00", "req_\x00"])
        forged = [base64.urlsafe_b64encode(json.dumps(position).encode()).decode() for position in odd]
        for cursor in ("not-a-cursor", "eyJ4Ijo1fQ", "x" * 300, *forged):
            refused = client.get(path, params={"cursor": cursor})
            assert refused.status_code == 422, refused.text
            assert "cursor" in refused.json()["detail"]


def test_loras_are_paged_newest_first(subnet):
    orch = subnet.start_orchestrator()
    key = subnet.new_key(orch)
    client = subnet.client(orch, key)
    made = [kit.trained_lora(orch.store, key.id, f"lora{i}", f"{i:064x}", 2).id for i in range(5)]
    walked, cursor = [], None
    while True:
        page = client.get("/v1/loras", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        walked += [lora["id"] for lora in page.json()]
        if (cursor := page.headers.get("x-next-cursor")) is None:
            break
    assert sorted(walked) == sorted(made) and len(walked) == 5
    # Another key's cursor position shows nothing of this key's.
    other = subnet.client(orch, subnet.new_key(orch))
    last = orch.store.list_loras(key.id)[0]
    assert other.get("/v1/loras", params={"cursor": encode_cursor(last.created_at, last.id)}).json() == []


def test_models_shows_the_profiles_real_limits(subnet):
    orch = subnet.start_orchestrator()
    client = subnet.client(orch, subnet.new_key(orch))
    tiny = profile_limits("tiny")
    (model,) = client.get("/v1/models").json()
    assert model["id"] == "tiny" and model["default"] is True
    assert (model["min_side"], model["max_side"], model["max_steps"]) == (tiny.min_side, tiny.max_side, tiny.max_steps)
    assert (model["default_steps"], model["default_guidance"]) == (tiny.default_steps, tiny.default_guidance)
    assert model["max_input_pixels"] == tiny.max_input_pixels and model["tasks"] == list(tiny.tasks)
    spec = client.get("/openapi.json").json()
    assert "/v1/models" in spec["paths"] and "/v1/requests/{request_id}/events" in spec["paths"]
    assert "X-Next-Cursor" in spec["paths"]["/v1/requests"]["get"]["responses"]["200"]["headers"]


# ---- a wait that times out; progress reports ---------------------------------------------------


def test_a_wait_that_times_out_answers_the_current_status(subnet):
    subnet.add_stub_miner("//Bob")  # takes the job and never calls back: it stays running
    orch = subnet.start_orchestrator()
    client = subnet.client(orch, subnet.new_key(orch))
    # Long enough for the job to be sent and taken (running) however slow that is on a loaded machine.
    answer = client.post("/v1/images", json=image_body(), headers={"Prefer": "wait=4"})
    assert answer.status_code == 202
    assert answer.json()["status"] == "running"


def _signed_progress(url: str, path: str, body: dict[str, Any], uri: str | None) -> httpx.Response:
    raw = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if uri is not None:
        headers |= sign_request(signer_from_uri(uri), "POST", path, raw, ORCHESTRATOR.ss58_address)
    return httpx.post(url + path, content=raw, headers=headers)


def test_only_the_jobs_miner_may_report_progress(subnet):
    subnet.add_stub_miner("//Bob")
    orch = subnet.start_orchestrator()
    client = subnet.client(orch, subnet.new_key(orch))
    request_id = client.post("/v1/images", json=image_body(steps=20)).json()["request_id"]
    view = wait_status(client, request_id, {"running"})
    path = f"/v1/miner-callbacks/{request_id}/progress"
    report = {"job_id": f"{request_id}-{view['attempts']}", "step": 5, "total": 20, "eta_s": 1.5}

    assert _signed_progress(orch.url, path, report, None).status_code == 401
    assert _signed_progress(orch.url, path, report, "//Charlie").status_code == 403  # a forger's own key
    tampered = json.dumps(report).encode()
    headers = sign_request(signer_from_uri("//Bob"), "POST", path, b"{}", ORCHESTRATOR.ss58_address)
    assert httpx.post(orch.url + path, content=tampered, headers=headers).status_code == 401
    assert client.get(f"/v1/requests/{request_id}").json()["progress"] is None

    old = _signed_progress(orch.url, path, {**report, "job_id": f"{request_id}-0"}, "//Bob")
    assert old.status_code == 410
    assert _signed_progress(orch.url, path, {**report, "step": 21}, "//Bob").status_code == 422
    assert _signed_progress(orch.url, path, {**report, "note": "x" * 2000}, "//Bob").status_code == 413
    assert _signed_progress(orch.url, path, report, "//Bob").status_code == 200
    shown = client.get(f"/v1/requests/{request_id}").json()
    assert shown["progress"] == {"step": 5, "total": 20, "loss": None, "eta_s": 1.5}
    assert "progress" not in shown["timings"]

    client.post(f"/v1/requests/{request_id}/cancel")
    assert _signed_progress(orch.url, path, report, "//Bob").status_code == 409
    assert client.get(f"/v1/requests/{request_id}").json()["progress"] is None


# ---- the event stream ----------------------------------------------------------------------------


def _follow(client: httpx.Client, request_id: str, add_miner: Any) -> list[tuple[str, Any]]:
    """The request's events; the miner joins once the stream has shown the request queued."""
    seen: list[tuple[str, Any]] = []
    for event, data in events(client, request_id):
        seen.append((event, data))
        if event == "queue":
            threading.Thread(target=add_miner, daemon=True).start()
    return seen


def _statuses(seen: list[tuple[str, Any]]) -> list[str]:
    return [data["status"] for event, data in seen if event == "status"]


def test_events_follow_an_image_from_queued_to_succeeded(subnet):
    orch = subnet.start_orchestrator()
    key = subnet.new_key(orch)
    client = subnet.client(orch, key)
    request_id = client.post("/v1/images", json=image_body(steps=50)).json()["request_id"]
    assert client.get(f"/v1/requests/{request_id}").json()["queue_position"] == 1
    stranger = subnet.client(orch, subnet.new_key(orch))
    assert stranger.get(f"/v1/requests/{request_id}/events").status_code == 404

    seen = _follow(client, request_id, lambda: subnet.add_miner("//Bob", settings={"progress_interval_s": 0.05}))
    statuses = _statuses(seen)
    assert statuses[0] == "queued" and statuses[-1] == "succeeded", seen
    assert "running" in statuses, seen
    assert seen[1] == ("queue", {"position": 1})
    progress = [data for event, data in seen if event == "progress"]
    assert progress and all(p["total"] == 50 and 0 <= p["step"] <= 50 for p in progress), seen
    steps = [p["step"] for p in progress]
    assert steps == sorted(steps)
    final = seen[-1][1]
    assert final["result"]["sha256"] and final["progress"] is None and final["queue_position"] is None


def test_events_follow_a_training_run_with_its_loss(subnet):
    orch = subnet.start_orchestrator()
    client = subnet.client(orch, subnet.new_key(orch))
    submitted = client.post(
        "/v1/loras",
        data={"trigger_word": "sks", "steps": "40", "rank": "2"},
        files={"dataset": ("sunsets.zip", dataset_zip(2))},
    )
    request_id = submitted.json()["request_id"]
    seen = _follow(client, request_id, lambda: subnet.add_miner("//Bob", settings={"progress_interval_s": 0.05}))
    statuses = _statuses(seen)
    assert statuses[0] == "queued" and "running" in statuses and statuses[-1] == "succeeded", seen
    progress = [data for event, data in seen if event == "progress"]
    assert progress, seen
    assert all(p["total"] == 40 and isinstance(p["loss"], float) and p["eta_s"] >= 0 for p in progress)


def test_a_stream_for_a_finished_request_sends_its_status_and_ends(subnet):
    subnet.add_miner("//Bob")
    orch = subnet.start_orchestrator()
    client = subnet.client(orch, subnet.new_key(orch))
    request_id = client.post("/v1/images", json=image_body()).json()["request_id"]
    wait_until(lambda: client.get(f"/v1/requests/{request_id}").json()["status"] == "succeeded", what="success")
    seen = list(events(client, request_id))
    assert [event for event, _ in seen] == ["status"] and seen[0][1]["status"] == "succeeded"


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_events_on_one_replica_follow_a_job_another_replica_runs(subnet, db_url):
    """The stream is on a replica that never dispatches: the job's dispatch, progress and result
    all reach the other one, and this one hears of them through the database."""
    runner = subnet.start_orchestrator(db_url=db_url)
    watcher = subnet.start_orchestrator(db_url=db_url, dispatch_interval_s=3600)
    key = subnet.new_key(runner)
    client = subnet.client(watcher, key)
    request_id = client.post("/v1/images", json=image_body(steps=50)).json()["request_id"]
    seen = _follow(client, request_id, lambda: subnet.add_miner("//Bob", settings={"progress_interval_s": 0.05}))
    statuses = _statuses(seen)
    assert statuses[0] == "queued" and "running" in statuses and statuses[-1] == "succeeded", seen
    assert any(event == "progress" for event, _ in seen), seen
    assert runner.store.load_job(request_id).miner_hotkey is not None
