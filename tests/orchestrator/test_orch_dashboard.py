"""The dashboard: the pure snapshot over hand-made records, the served page, JSON, event stream
and images against real miners (one honest, one caught cheating), and the operator token that
every dashboard path needs (off without one)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest

import orchestrator.orch_kit as kit
from dippy_studio.chain.base import Neuron
from dippy_studio.orchestrator import kinds
from dippy_studio.orchestrator.dashboard import (
    AUDIT_FAILURES_SHOWN,
    GALLERY_SIZE,
    PLOT_BUCKETS,
    STREAM_S,
    ChainView,
    DashboardInput,
    build_snapshot,
    consensus_weights,
)
from dippy_studio.orchestrator.models import Audit, Job, JobAttempt, Miner
from dippy_studio.orchestrator.store import Success, job_row
from orchestrator.orch_kit import bad_runner, image_body, noise_png, sha256, wait_until

subnet = kit.subnet  # fixture: a local chain, miners and orchestrators

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
TOKEN = "operator-token-for-tests-0123456789"
OPERATOR = {"Authorization": f"Bearer {TOKEN}"}
ALICE, BOB = "5Alice", "5Bob"


def miner(hotkey: str, uid: int, healthy: bool = True) -> Miner:
    return Miner(
        hotkey=hotkey, uid=uid, endpoint=f"http://{hotkey}", healthy=healthy, last_probe_at=NOW,
        capacity={"profile": "tiny"}, fingerprints=[f"fp-{hotkey}"],
    )  # fmt: skip


def job(
    n: int,
    hotkey: str,
    *,
    status: str = "succeeded",
    seconds_ago: float = 10,
    took: float = 1.0,
    kind: str = "inference",
    model: str = "tiny",
    **inputs: object,
) -> Job:
    created = NOW - timedelta(seconds=seconds_ago)
    return Job(
        id=f"req_{n:03d}", api_key_id="k", kind=kind, model=model, status=status, created_at=created,
        updated_at=created,
        deadline=NOW, attempt_timeout_s=60.0, miner_hotkey=hotkey, miner_uid=1 if hotkey == ALICE else 2,
        finished_at=created + timedelta(seconds=took) if status == "succeeded" else None,
        result_blob=f"blob{n}" if status == "succeeded" else None, fingerprint=f"fp-{hotkey}",
        payload={"prompt": f"prompt {n}", "seed": n, "width": 64, "height": 64, "loras": [], **inputs},
    )  # fmt: skip


IMAGE_KINDS = ("edit", "img2img", "inpaint")


@pytest.fixture
def image_kinds() -> dict[str, kinds.JobKindSpec]:
    """The editing kinds as the registry has them (their labels are what the page shows)."""
    return {name: kinds.get(name) for name in IMAGE_KINDS}


def attempt(job_id: str, hotkey: str, outcome: str, latency: float, seconds_ago: float) -> JobAttempt:
    finished = NOW - timedelta(seconds=seconds_ago)
    return JobAttempt(
        job_id=job_id, attempt=1, miner_hotkey=hotkey, dispatched_at=finished - timedelta(seconds=latency),
        finished_at=finished, outcome=outcome, latency_s=latency,
    )  # fmt: skip


def failed_audit(audit_id: int, job_id: str, hotkey: str, seconds_ago: float) -> Audit:
    evidence = {
        "kind": "inference",
        "request": {"prompt": "a lighthouse", "seed": 7},
        "miner": {"sha256": "aa", "fingerprint": "fp-x"},
        "reference": {"sha256": "bb", "fingerprint": "fp-ref", "loras": []},
        "reference_blob": "ref",
        "verdict": {"label": "fail", "reason": "SSIM 0.2 under 0.99999", "metrics": {"ssim": 0.2}},
    }
    created = NOW - timedelta(seconds=seconds_ago)
    return Audit(id=audit_id, job_id=job_id, miner_hotkey=hotkey, verdict="fail", evidence=evidence, created_at=created)


def snapshot(**overrides) -> dict:
    values = dict(
        now=NOW, window_start=NOW - timedelta(hours=1), profile="tiny", orchestrator="5Orch",
        jobs=[], attempts=[], audits=[], miners=[miner(ALICE, 1), miner(BOB, 2)], scores={}, chain=ChainView(),
    )  # fmt: skip
    return build_snapshot(DashboardInput(**{**values, **overrides}))


def test_per_miner_outcomes_latency_percentiles_and_plot_series():
    latencies = [0.1, 0.2, 0.3, 0.4, 1.0]
    attempts = [attempt(f"req_{i:03d}", ALICE, "succeeded", s, seconds_ago=50 - i) for i, s in enumerate(latencies)]
    attempts += [attempt("req_100", ALICE, "timeout", 60, 5), attempt("req_101", BOB, "failed", 2, 5)]
    attempts.append(attempt("req_old", ALICE, "succeeded", 9.0, seconds_ago=2 * 3600))  # before the window
    snap = snapshot(attempts=attempts)
    alice, bob = snap["miners"]
    assert (alice["uid"], bob["uid"]) == (1, 2)
    assert alice["outcomes"] == {"succeeded": 5, "timeout": 1} and alice["jobs"] == 6
    assert bob["outcomes"] == {"failed": 1} and bob["latency"] == {"p50": None, "p95": None}
    assert alice["latency"]["p50"] == pytest.approx(0.3)
    assert alice["latency"]["p95"] == pytest.approx(0.88)  # linear between 0.4 and 1.0
    series = alice["series"]
    assert len(series) == PLOT_BUCKETS and sum(p["n"] for p in series) == 5
    assert series[-1]["t"] == NOW.isoformat()
    # The plot spans the data: here its last minute, so the 5 successes spread over several buckets.
    assert sum(1 for p in series if p["n"]) > 1
    assert all(p["p50"] is None for p in series if p["n"] == 0)


def test_status_scores_and_chain_weights():
    chain = ChainView(
        block=42,
        neurons={
            ALICE: Neuron(uid=1, hotkey=ALICE, coldkey="c", stake=0.0, validator_permit=False, emission=0.75),
            BOB: Neuron(uid=2, hotkey=BOB, coldkey="c", stake=0.0, validator_permit=False, emission=0.0),
        },
        weights={1: 1.0},
    )
    audits = [failed_audit(1, "req_001", BOB, seconds_ago=30)]
    validator = Miner(hotkey="5Val", uid=0, endpoint=None, healthy=False, capacity={}, fingerprints=[])
    snap = snapshot(
        miners=[miner(ALICE, 1), miner(BOB, 2), miner("5Carol", 3, healthy=False), validator],
        audits=audits,
        scores={ALICE: 0.9, BOB: 0.0},
        chain=chain,
    )
    alice, bob, carol = snap["miners"]  # not the validator: it serves nothing
    assert snap["block"] == 42
    assert (alice["status"], bob["status"], carol["status"]) == ("healthy", "penalized", "unreachable")
    assert bob["penalized_until"] is not None and bob["audits"] == {"pass": 0, "fail": 1, "inconclusive": 0}
    assert (alice["score"], alice["weight"], alice["emission"]) == (0.9, 1.0, 0.75)
    assert (bob["score"], bob["weight"]) == (0.0, 0.0)
    assert carol["weight"] is None  # not on the chain view at all


def test_consensus_weights_average_validator_rows_by_stake():
    rows = {0: {2: 1.0}, 1: {2: 0.5, 3: 0.5}}
    assert consensus_weights(rows, {0: 3.0, 1: 1.0}) == pytest.approx({2: 0.875, 3: 0.125})
    assert consensus_weights(rows, {}) == pytest.approx({2: 0.75, 3: 0.25})


def test_gallery_newest_first_and_capped_and_audit_failures_with_evidence():
    jobs = [job(i, ALICE, seconds_ago=100 - i) for i in range(GALLERY_SIZE + 3)]
    jobs.append(job(99, BOB, status="running"))
    audits = [failed_audit(7, "req_003", ALICE, seconds_ago=20)]
    snap = snapshot(jobs=jobs, audits=audits)
    ids = [item["job_id"] for item in snap["gallery"]]
    assert len(ids) == GALLERY_SIZE and ids[0] == f"req_{GALLERY_SIZE + 2:03d}" and "req_099" not in ids
    assert snap["gallery"][0]["image"] == f"/dashboard/images/{ids[0]}.png"
    [failure] = snap["audit_failures"]
    assert failure["job_id"] == "req_003" and failure["miner_uid"] == 1
    assert failure["reason"].startswith("SSIM") and failure["metrics"] == {"ssim": 0.2}
    assert failure["miner_image"] == "/dashboard/images/req_003.png"
    assert failure["reference_image"] == "/dashboard/audits/7/reference.png"
    assert (failure["miner"]["sha256"], failure["reference"]["sha256"]) == ("aa", "bb")
    assert snapshot(jobs=jobs, gallery=False)["gallery"] is None


def test_profiles_count_volume_and_latency_per_fingerprint():
    jobs = [job(1, ALICE, took=1.0), job(2, ALICE, took=3.0), job(3, BOB, took=2.0), job(4, BOB, status="queued")]
    jobs[3].fingerprint = None
    rows = {(r["profile"], r["fingerprint"]): r for r in snapshot(jobs=jobs)["profiles"]}
    assert rows[("tiny", f"fp-{ALICE}")]["jobs"] == 2
    assert rows[("tiny", f"fp-{ALICE}")]["latency"]["p50"] == pytest.approx(2.0)
    assert rows[("tiny", None)]["jobs"] == 1 and rows[("tiny", None)]["succeeded"] == 0
    totals = snapshot(jobs=jobs)["totals"]
    assert totals["requests"]["succeeded"] == 3 and totals["requests"]["queued"] == 1


def test_kinds_count_volume_and_latency_per_job_kind_under_the_registry_label(image_kinds):
    jobs = [job(1, ALICE, took=1.0), job(2, BOB, took=3.0), job(3, BOB, status="failed")]
    jobs += [job(10 + i, ALICE, kind="edit", took=t) for i, t in enumerate((2.0, 4.0, 6.0, 8.0, 10.0))]
    jobs += [job(20, BOB, kind="inpaint", status="queued")]
    rows = {row["kind"]: row for row in snapshot(jobs=jobs)["kinds"]}
    assert list(rows) == ["edit", "inference", "inpaint"]  # only kinds with jobs in the window
    assert rows["inference"]["label"] == "text-to-image"
    assert rows["edit"]["label"] == image_kinds["edit"].label and rows["edit"]["label"]
    assert (rows["inference"]["jobs"], rows["inference"]["succeeded"], rows["inference"]["failed"]) == (3, 2, 1)
    assert rows["inference"]["latency"]["p50"] == pytest.approx(2.0)
    assert rows["edit"]["jobs"] == 5 and rows["edit"]["latency"]["p50"] == pytest.approx(6.0)
    assert rows["edit"]["latency"]["p95"] == pytest.approx(9.6)
    assert rows["inpaint"] == {**rows["inpaint"], "jobs": 1, "succeeded": 0, "latency": {"p50": None, "p95": None}}
    # The per-profile view names kinds the same way.
    labels = {(r["kind"], r["label"]) for r in snapshot(jobs=jobs)["profiles"]}
    assert ("inference", "text-to-image") in labels and ("edit", image_kinds["edit"].label) in labels


def test_gallery_shows_an_edit_beside_its_input_and_an_inpaint_beside_its_mask(image_kinds):
    image, mask = "a" * 64, "b" * 64
    jobs = [
        job(1, ALICE, seconds_ago=30),
        job(2, ALICE, seconds_ago=20, kind="edit", task="edit", image_sha256=image),
        job(3, BOB, seconds_ago=10, kind="inpaint", task="inpaint", image_sha256=image, mask_sha256=mask, strength=0.8),
    ]
    audits = [failed_audit(4, "req_002", ALICE, seconds_ago=5)]
    snap = snapshot(jobs=jobs, audits=audits)
    inpaint, edit, generate = snap["gallery"]
    assert edit["input_image"] == f"/dashboard/inputs/req_002/{image}.png" and edit["mask_image"] is None
    assert (edit["task"], edit["label"], edit["image"]) == (
        "edit",
        image_kinds["edit"].label,
        "/dashboard/images/req_002.png",
    )
    assert inpaint["input_image"] == f"/dashboard/inputs/req_003/{image}.png"
    assert inpaint["mask_image"] == f"/dashboard/inputs/req_003/{mask}.png" and inpaint["strength"] == 0.8
    assert inpaint["prompt"] == "prompt 3"
    assert generate["input_image"] is None and generate["mask_image"] is None and generate["label"] == "text-to-image"
    # A failed audit of an edit shows the input beside the miner's and the reference's images.
    [failure] = snap["audit_failures"]
    assert failure["input_image"] == edit["input_image"] and failure["mask_image"] is None
    assert (failure["kind"], failure["label"]) == ("edit", image_kinds["edit"].label)


def test_the_served_dashboard_shows_real_jobs_audits_and_images(subnet, tmp_path):
    honest = subnet.add_miner("//Bob")
    cheat = subnet.add_miner("//Eve", inference_runner=bad_runner(tmp_path, lambda j: noise_png(seed=j["seed"])))
    orch = subnet.start_orchestrator(audit_all=True, dashboard_refresh_s=0.1, dashboard_token=TOKEN)
    client = subnet.client(orch, subnet.new_key(orch))
    # Routing draws at random (an honest miner's score at most doubles its share), so submit
    # until both miners have served, at least six jobs and at most thirty.
    served_by: dict[str, str | None] = {}
    for seed in range(30):
        response = client.post("/v1/images", json=image_body(seed=seed), headers={"Prefer": "wait=30"})
        request_id = response.json()["request_id"]
        served_by[request_id] = orch.store.load_job(request_id).miner_hotkey
        if len(served_by) >= 6 and {honest.hotkey, cheat.hotkey} <= set(served_by.values()):
            break
    ids = list(served_by)
    wait_until(lambda: len(orch.store.list_audits()) == len(ids), 60, "every job audited")
    by_miner = {hotkey: [i for i in ids if served_by[i] == hotkey] for hotkey in (honest.hotkey, cheat.hotkey)}
    assert all(by_miner.values()), "both miners got work"

    web = httpx.Client(base_url=orch.url, headers=OPERATOR, timeout=30)
    page = web.get("/dashboard")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/dashboard/static/dashboard.js" in page.text and "//cdn" not in page.text
    assert web.get("/dashboard/static/dashboard.js").status_code == 200

    state = wait_until(lambda: (s := web.get("/dashboard/api/state").json())["audit_failures"] and s, 10, "state")
    miners = {m["hotkey"]: m for m in state["miners"]}
    for hotkey, mine in by_miner.items():
        assert miners[hotkey]["outcomes"].get("succeeded") == len(mine)
        assert miners[hotkey]["latency"]["p50"] > 0
    assert miners[cheat.hotkey]["audits"]["fail"] == len(by_miner[cheat.hotkey])
    assert miners[cheat.hotkey]["status"] == "penalized" and miners[honest.hotkey]["audits"]["fail"] == 0
    # Every job, and every failure, unless routing took more than the page shows (then the latest).
    gallery, failures = {item["job_id"] for item in state["gallery"]}, {f["job_id"] for f in state["audit_failures"]}
    assert gallery <= set(ids) and len(gallery) == min(len(ids), GALLERY_SIZE)
    cheated = by_miner[cheat.hotkey]
    assert failures <= set(cheated) and len(failures) == min(len(cheated), AUDIT_FAILURES_SHOWN)
    assert state["totals"]["requests"]["succeeded"] == len(ids)

    failure = state["audit_failures"][0]
    for url in (failure["miner_image"], failure["reference_image"], state["gallery"][0]["image"]):
        image = web.get(url)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG"), url
    assert web.get("/dashboard/images/req_nope.png").status_code == 404
    assert web.get("/dashboard/audits/999999/reference.png").status_code == 404

    # The live stream: the first event carries the same snapshot.
    with web.stream("GET", "/dashboard/api/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        data = next(line for line in lines if line.startswith("data: "))
    streamed = json.loads(data.removeprefix("data: "))
    assert {m["hotkey"] for m in streamed["miners"]} == set(miners)
    web.close()


def test_the_gallery_can_be_turned_off(subnet):
    subnet.add_miner("//Bob")
    orch = subnet.start_orchestrator(dashboard_gallery=False, dashboard_token=TOKEN)
    client = subnet.client(orch, subnet.new_key(orch))
    request_id = client.post("/v1/images", json=image_body(), headers={"Prefer": "wait=30"}).json()["request_id"]
    assert httpx.get(f"{orch.url}/dashboard/api/state", headers=OPERATOR).json()["gallery"] is None
    assert httpx.get(f"{orch.url}/dashboard/images/{request_id}.png", headers=OPERATOR).status_code == 404


def test_the_dashboard_counts_the_audits_still_owed(subnet):
    """A pick waits for its verdict while the audits leader is behind (or none leads): the
    operator sees how many, from every replica's picks, until the verdict is in."""
    subnet.add_miner("//Bob")
    orch = subnet.start_orchestrator(dashboard_refresh_s=0.1, dashboard_token=TOKEN)  # audits nothing
    client = subnet.client(orch, subnet.new_key(orch))
    request_id = client.post("/v1/images", json=image_body(), headers={"Prefer": "wait=30"}).json()["request_id"]

    def owed() -> int:
        return httpx.get(f"{orch.url}/dashboard/api/state", headers=OPERATOR).json()["totals"]["audits_owed"]

    assert owed() == 0
    orch.store.flag_for_audit(request_id)  # another replica's pick
    wait_until(lambda: owed() == 1, 10, "the pick counted")
    orch.store.add_audit(request_id, orch.store.load_job(request_id).miner_hotkey, "pass")
    wait_until(lambda: owed() == 0, 10, "the verdict to settle it")


# Every kind of dashboard path: the page, its assets, the state, the stream, the image routes.
DASHBOARD_PATHS = [
    "/dashboard", "/dashboard/static/dashboard.js", "/dashboard/api/state", "/dashboard/api/events",
    "/dashboard/images/req_x.png", "/dashboard/audits/1/reference.png", f"/dashboard/inputs/req_x/{'0' * 64}.png",
]  # fmt: skip


def finished_image_job(orch, key_id: str, kind: str, payload: dict, result: bytes) -> str:
    """A job of `kind` that a miner finished with `result`, put through the store as dispatch and
    a callback would (the orchestrator has no miners, so it never claims the job itself)."""
    store = orch.store
    deadline = datetime.now(UTC) + timedelta(hours=1)
    (queued,) = store.insert_jobs([job_row(key_id, kind, payload, deadline, 60)])
    (claimed,) = store.claim_for_dispatch(1, kinds=[kind], assign=lambda job, tried: ("5Miner", 1))
    assert claimed.id == queued.id
    blob = orch.orch.results.put(result)
    assert store.succeed(queued.id, Success(blob, len(result), "fp-miner", {}), attempt=1)
    return queued.id


def test_the_input_images_of_edits_are_served_to_the_operator_only(subnet, image_kinds):
    orch = subnet.start_orchestrator(dashboard_refresh_s=0.05, dashboard_token=TOKEN)
    assets, key_id = orch.orch.assets, subnet.new_key(orch).id
    image, mask, result = noise_png(seed=1), noise_png(seed=2), noise_png(seed=3)
    image_sha, mask_sha = assets.put(image), assets.put(mask)
    other = assets.put(b"a LoRA or a dataset of another client")  # in the same store, named by no input
    common = {"prompt": "make it night", "seed": 1, "width": 64, "height": 64, "steps": 2, "loras": []}
    edit = finished_image_job(orch, key_id, "edit", {**common, "task": "edit", "image_sha256": image_sha}, result)
    inpaint_payload = {**common, "task": "inpaint", "image_sha256": image_sha, "mask_sha256": mask_sha, "strength": 0.9}
    inpaint = finished_image_job(orch, key_id, "inpaint", inpaint_payload, result)

    with httpx.Client(base_url=orch.url, headers=OPERATOR, timeout=30) as web:
        state = wait_until(lambda: (s := web.get("/dashboard/api/state").json())["gallery"] and s, 10, "state")
        gallery = {item["job_id"]: item for item in state["gallery"]}
        assert gallery[edit]["input_image"] == f"/dashboard/inputs/{edit}/{image_sha}.png"
        assert gallery[inpaint]["mask_image"] == f"/dashboard/inputs/{inpaint}/{mask_sha}.png"
        kinds_seen = {row["kind"]: row for row in state["kinds"]}
        assert kinds_seen["edit"]["succeeded"] == 1 and kinds_seen["inpaint"]["jobs"] == 1

        for url, expected in ((gallery[edit]["input_image"], image), (gallery[inpaint]["mask_image"], mask)):
            served = web.get(url)
            assert served.status_code == 200 and served.headers["content-type"] == "image/png"
            assert served.content == expected and sha256(served.content) in url
        assert web.get(gallery[edit]["image"]).content == result
        # Only what a job names, under that job: not an open server of the assets store.
        for url in (
            f"/dashboard/inputs/{edit}/{other}.png",
            f"/dashboard/inputs/{edit}/{mask_sha}.png",  # the inpaint's mask, not this edit's
            f"/dashboard/inputs/req_nope/{image_sha}.png",
        ):
            assert web.get(url).status_code == 404, url

    for headers in ({}, {"Authorization": "Bearer not-the-operator-token-at-all"}):
        answer = httpx.get(f"{orch.url}{gallery[edit]['input_image']}", headers=headers)
        assert answer.status_code == 401 and b"PNG" not in answer.content


def test_the_dashboard_is_off_without_an_operator_token(subnet):
    for orch in (
        subnet.start_orchestrator(),
        subnet.start_orchestrator(dashboard=True),
        subnet.start_orchestrator(dashboard=False),
    ):
        for path in DASHBOARD_PATHS:
            answer = httpx.get(f"{orch.url}{path}", headers=OPERATOR)
            assert answer.status_code == 404, path
            assert "set DIPPY_ORCH_DASHBOARD_TOKEN" in answer.json()["detail"], path
        assert httpx.get(f"{orch.url}/dashboard?token={TOKEN}").status_code == 404
        spec = httpx.get(f"{orch.url}/openapi.json").json()
        assert not [path for path in spec["paths"] if path.startswith("/dashboard")]
    # A token does not turn on a dashboard the operator turned off.
    off = subnet.start_orchestrator(dashboard=False, dashboard_token=TOKEN)
    answer = httpx.get(f"{off.url}/dashboard/api/state", headers=OPERATOR)
    assert answer.status_code == 404 and "DIPPY_ORCH_DASHBOARD is false" in answer.json()["detail"]


def test_every_dashboard_path_needs_the_operator_token(subnet):
    subnet.add_miner("//Bob")
    orch = subnet.start_orchestrator(dashboard_token=TOKEN)
    key = subnet.new_key(orch)
    client = subnet.client(orch, key)
    request_id = client.post("/v1/images", json=image_body(), headers={"Prefer": "wait=30"}).json()["request_id"]
    assert client.get(f"/v1/requests/{request_id}").json()["status"] == "succeeded"
    image = f"/dashboard/images/{request_id}.png"

    refused = {
        "none": {},
        "wrong token": {"Authorization": "Bearer not-the-operator-token-at-all"},
        "a client's API key": {"Authorization": f"Bearer {key.secret}"},
        "a forged cookie": {"Cookie": "dippy_dashboard=0123abcd"},
    }
    for what, headers in refused.items():
        for path in [*DASHBOARD_PATHS, image]:
            answer = httpx.get(f"{orch.url}{path}", headers=headers)
            assert answer.status_code == 401, (what, path)
            assert answer.headers["www-authenticate"].startswith("Bearer")
            detail = answer.json()["detail"]
            assert detail.startswith("the dashboard needs" if what == "none" else "wrong dashboard token"), detail
    # The API a client uses is not behind the operator token.
    assert client.get(f"/v1/requests/{request_id}/result").status_code == 200

    with httpx.Client(base_url=orch.url, headers=OPERATOR, timeout=30) as operator:
        assert operator.get("/dashboard").status_code == 200
        assert {item["job_id"] for item in operator.get("/dashboard/api/state").json()["gallery"]} == {request_id}
        assert operator.get(image).content.startswith(b"\x89PNG")

    # A browser: the token URL sets the cookie and sends it away, then the cookie alone opens
    # the page, the state it fetches and the images it shows.
    with httpx.Client(base_url=orch.url, timeout=30, follow_redirects=True) as browser:
        assert browser.get(f"/dashboard?token={TOKEN}x").status_code == 401 and not browser.cookies
        opened = browser.get(f"/dashboard?token={TOKEN}")
        [redirect] = opened.history
        assert redirect.status_code == 303 and redirect.headers["location"] == "/dashboard"
        cookie = redirect.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/dashboard" in cookie
        assert TOKEN.lower() not in cookie, "the cookie holds a digest, not the token"
        assert opened.status_code == 200 and str(opened.url) == f"{orch.url}/dashboard"
        assert "text/html" in opened.headers["content-type"]
        assert browser.get("/dashboard/static/dashboard.js").status_code == 200
        assert browser.get("/dashboard/api/state").json()["gallery"][0]["job_id"] == request_id
        assert browser.get(image).content.startswith(b"\x89PNG")
        with browser.stream("GET", "/dashboard/api/events") as stream:
            assert stream.status_code == 200
            assert any(line.startswith("data: ") for line in stream.iter_lines())


def test_the_schema_names_the_operator_token_on_dashboard_routes(subnet):
    orch = subnet.start_orchestrator(dashboard_token=TOKEN)
    spec = httpx.get(f"{orch.url}/openapi.json").json()
    for path in ("/dashboard/api/state", "/dashboard/api/events"):
        assert "401" in spec["paths"][path]["get"]["responses"], path


@pytest.mark.parametrize("token", ["short-token", "a token with spaces in it", "tokén-with-accents-0123456789", ""])
def test_a_weak_or_unsafe_operator_token_is_refused_with_the_reason(token):
    from pydantic import ValidationError

    from dippy_studio.orchestrator.settings import OrchestratorSettings

    with pytest.raises(ValidationError, match="dashboard_token must be at least 16 characters"):
        OrchestratorSettings(dashboard_token=token)
    assert OrchestratorSettings(dashboard_token=TOKEN).dashboard_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(OrchestratorSettings(dashboard_token=TOKEN)), "the token stays out of logs"


def test_event_streams_end_at_once_when_the_server_closes(subnet):
    """Ctrl-C sets sse-starlette's exit flag (its patch of uvicorn's `handle_exit`): an open
    dashboard stream ends then, not after its 15 s, so the server's shutdown does not wait on it."""
    import threading
    import time

    from sse_starlette.sse import AppStatus

    orch = subnet.start_orchestrator(dashboard_refresh_s=5.0, dashboard_token=TOKEN)
    browser = httpx.Client(base_url=orch.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    with browser, browser.stream("GET", "/dashboard/api/events") as stream:
        assert stream.status_code == 200
        threading.Timer(0.5, lambda: setattr(AppStatus, "should_exit", True)).start()
        started = time.monotonic()
        lines = list(stream.iter_lines())
    # Not after the stream's 15 s (dashboard.STREAM_S): at once, which is the 0.5 s timer, up to
    # sse-starlette's 0.5 s check of the flag, and what a loaded machine adds to both.
    assert time.monotonic() - started < STREAM_S / 2, "a closing server must not wait out the stream"
    assert "event: snapshot" in lines and any(line.startswith("data: {") for line in lines)


def test_latency_percentiles_interpolate_between_ranks_as_numpy_does():
    import numpy as np

    from dippy_studio.orchestrator.dashboard import percentile

    assert percentile([], 50) is None
    for values in ([3.0], [1.0, 2.0], [0.5, 9.0, 2.0, 7.5, 1.25], list(range(101))):
        for q in (0, 50, 95, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
