"""Several models through one orchestrator: requests name a `model`, jobs go only to miners
serving it, audits re-run on a reference of it, and `/v1/models` and the dashboard show each.
The end-to-end test runs real tiny and tiny-kontext miners."""

from __future__ import annotations

import base64
import io
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

import orchestrator.orch_kit as kit
from dippy_studio.engine import Engine, EngineOptions
from dippy_studio.orchestrator.app import create_app
from dippy_studio.orchestrator.db import make_engine, upgrade
from dippy_studio.orchestrator.settings import OrchestratorSettings
from orchestrator.orch_kit import ORCHESTRATOR, image_body, wait_status, wait_until

subnet = kit.subnet  # fixture: a local chain, miners and orchestrators
TOKEN = "operator-token-for-tests-0123456789"


def png_data_uri(size: int = 32) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 120, 40)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# ---- settings --------------------------------------------------------------------------------------


def test_models_come_from_the_environment_comma_separated_or_as_json(monkeypatch):
    monkeypatch.setenv("DIPPY_ORCH_MODELS", "tiny-kontext, small")
    assert OrchestratorSettings().served_models == ["tiny", "tiny-kontext", "small"]
    monkeypatch.setenv("DIPPY_ORCH_MODELS", '["tiny-kontext", "tiny"]')
    assert OrchestratorSettings(profile="tiny-kontext").served_models == ["tiny-kontext", "tiny"]


@pytest.mark.parametrize("field", ["profile", "models"])
def test_an_unknown_model_stops_startup_naming_the_known_ones(field):
    value: Any = "sdxl-nope" if field == "profile" else ["tiny", "sdxl-nope"]
    with pytest.raises(ValidationError) as refused:
        OrchestratorSettings(**{field: value})
    assert "unknown model 'sdxl-nope'" in str(refused.value) and "tiny-kontext" in str(refused.value)


# ---- the API, in process ---------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path):
    settings = OrchestratorSettings(data_dir=tmp_path / "orch", models=["tiny-kontext"], audit=False)
    with TestClient(create_app(settings, signer=ORCHESTRATOR)) as client:
        created = client.app.state.orchestrator.store.create_api_key("client", rate_limit_per_minute=10_000)
        client.headers["Authorization"] = f"Bearer {created.secret}"
        client.key_id = created.key.id  # type: ignore[attr-defined]
        yield client


def test_requests_are_for_the_model_they_name_or_the_default(api):
    default = api.post("/v1/images", json=image_body())
    named = api.post("/v1/images", json=image_body(model="tiny-kontext"))
    assert default.status_code == named.status_code == 202
    assert api.get(f"/v1/requests/{default.json()['request_id']}").json()["model"] == "tiny"
    assert api.get(f"/v1/requests/{named.json()['request_id']}").json()["model"] == "tiny-kontext"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (image_body(model="flux-dev"), "model 'flux-dev' is not served here; models: tiny, tiny-kontext"),
        # tiny-kontext serves edit and generate only: its limits, not the default's, apply.
        (
            {"model": "tiny-kontext", "task": "img2img", "prompt": "oil", "image": png_data_uri(), "strength": 0.5},
            "profile tiny-kontext does not serve task img2img (it serves: edit, generate)",
        ),
        (image_body(model="tiny-kontext", width=512, height=512), "width 512 is outside 16..256"),
    ],
)
def test_a_request_the_model_cannot_serve_is_refused_with_the_reason(api, body, reason):
    refused = api.post("/v1/images", json=body)
    assert refused.status_code == 422, refused.text
    assert reason in refused.json()["detail"]


def test_a_lora_serves_only_the_model_it_was_trained_for(api):
    store = api.app.state.orchestrator.store
    lora = kit.trained_lora(store, api.key_id, "style", "a" * 64, 4, model="tiny-kontext")
    assert api.get(f"/v1/loras/{lora.id}").json()["model"] == "tiny-kontext"
    refused = api.post("/v1/images", json=image_body(loras=[{"id": lora.id}]))
    assert refused.status_code == 422
    assert (
        refused.json()["detail"] == f"LoRA {lora.id} was trained for model tiny-kontext; this request is for model tiny"
    )
    assert api.post("/v1/images", json=image_body(model="tiny-kontext", loras=[{"id": lora.id}])).status_code == 202


def test_training_names_its_model_and_its_lora_is_for_that_model(api):
    zipped = kit.dataset_zip(2)
    files = {"dataset": ("d.zip", zipped, "application/zip")}
    submitted = api.post("/v1/loras", data={"trigger_word": "sks", "model": "tiny-kontext"}, files=files)
    assert submitted.status_code == 202, submitted.text
    assert api.get(f"/v1/requests/{submitted.json()['request_id']}").json()["model"] == "tiny-kontext"
    refused = api.post("/v1/loras", data={"trigger_word": "sks", "model": "flux-dev"}, files=files)
    assert refused.status_code == 422 and "model 'flux-dev' is not served here" in refused.json()["detail"]


def test_v1_models_lists_every_served_model_with_its_real_limits_and_kinds(api):
    models = {m["id"]: m for m in api.get("/v1/models").json()}
    assert list(models) == ["tiny", "tiny-kontext"]
    assert models["tiny"]["default"] and not models["tiny-kontext"]["default"]
    assert (models["tiny"]["max_side"], models["tiny"]["min_side"], models["tiny"]["max_steps"]) == (256, 16, 50)
    assert models["tiny-kontext"]["tasks"] == ["edit", "generate"]
    assert models["tiny-kontext"]["kinds"] == ["inference", "edit", "training"]
    assert models["tiny"]["kinds"] == ["inference", "edit", "img2img", "inpaint", "training"]
    assert models["tiny-kontext"]["default_guidance"] == 2.5


def test_openai_model_maps_to_ours_and_an_unknown_one_names_the_served_models(api):
    body = {"prompt": "a lighthouse", "size": "32x32", "steps": 1, "seed": 1}
    # No miner: the call is refused for want of one, after the model was accepted.
    accepted = api.post("/v1/images/generations", json={**body, "model": "tiny-kontext"})
    assert accepted.status_code == 503, accepted.text
    (job,) = api.app.state.orchestrator.store.list_recent_jobs(since=datetime(2000, 1, 1, tzinfo=UTC))
    assert job.model == "tiny-kontext"
    refused = api.post("/v1/images/generations", json={**body, "model": "dall-e-3"})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "model_not_found" and "serves 'tiny', 'tiny-kontext'" in error["message"]


def test_the_sdk_sends_model(subnet):
    from dippy_studio.client import Client

    orch = subnet.start_orchestrator(models=["tiny-kontext"])
    with Client(orch.url, subnet.new_key(orch).secret) as client:
        request = client.submit("a lighthouse", model="tiny-kontext", width=32, height=32, steps=1, seed=3)
        assert client.get(request.id).model == "tiny-kontext"
        assert {m.id: m.default for m in client.models()} == {"tiny": True, "tiny-kontext": False}


# ---- the migration ----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def old_database(request: pytest.FixtureRequest, tmp_path) -> str:
    """A database at revision 0005 holding a succeeded job and its LoRA."""
    url = (
        f"sqlite:///{tmp_path / 'o.sqlite'}" if request.param == "sqlite" else request.getfixturevalue("pg_databases")()
    )
    upgrade(url, "0005")
    now = datetime(2026, 12, 1, tzinfo=UTC)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO api_keys (id, name, key_hash, webhook_secret, rate_limit_per_minute, created_at) "
                    "VALUES ('k1', 'old', 'h', 's', 10, :now)"
                ),
                {"now": now},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO jobs (id, api_key_id, kind, status, payload, created_at, updated_at, deadline, "
                    "attempts, max_attempts, attempt_timeout_s, timings, webhook_state, webhook_attempts, audit) "
                    "VALUES ('req_old', 'k1', 'training', 'queued', '{}', :now, :now, :now, 0, 3, 60, '{}', "
                    "'none', 0, false)"
                ),
                {"now": now},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO loras (id, api_key_id, name, sha256, trigger_word, rank, created_at, source_job_id) "
                    "VALUES ('lora_old', 'k1', 'x', :sha, 'sks', 4, :now, 'req_old')"
                ),
                {"now": now, "sha": "a" * 64},
            )
    finally:
        engine.dispose()
    return url


def test_the_migration_labels_old_rows_with_the_default_model_and_keeps_the_state_machine(old_database):
    upgrade(old_database, default_model="tiny-kontext")
    engine = make_engine(old_database)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT model FROM jobs")).scalars().all() == ["tiny-kontext"]
            assert conn.execute(sa.text("SELECT model FROM loras")).scalars().all() == ["tiny-kontext"]
        # The job state machine's trigger survived: queued -> succeeded is not a transition.
        with pytest.raises(sa.exc.DBAPIError), engine.begin() as conn:
            conn.execute(sa.text("UPDATE jobs SET status = 'succeeded' WHERE id = 'req_old'"))
    finally:
        engine.dispose()


# ---- end to end: two models, two miners, one orchestrator ---------------------------------------


@pytest.fixture(scope="module")
def kontext_engine() -> Engine:
    return Engine(EngineOptions(profile="tiny-kontext"))


def test_two_models_are_routed_audited_and_shown_each_on_its_own(subnet, kontext_engine):
    tiny_miner = subnet.add_miner("//Bob")
    kontext_miner = subnet.add_miner("//Charlie", engine=kontext_engine)
    # auditor=None: the orchestrator builds a reference engine per model, as in production.
    orch = subnet.start_orchestrator(
        audit_all=True, auditor=None, models=["tiny-kontext"], dashboard_token=TOKEN, dashboard_refresh_s=0.1
    )
    client = subnet.client(orch, subnet.new_key(orch))
    bodies = {
        "tiny": image_body(seed=1),
        "kontext-generate": image_body(seed=2, model="tiny-kontext"),
        "kontext-edit": {"model": "tiny-kontext", "task": "edit", "prompt": "make it night",
                         "image": png_data_uri(), "seed": 3, "steps": 2},
    }  # fmt: skip
    ids = {name: client.post("/v1/images", json=body).json()["request_id"] for name, body in bodies.items()}
    for request_id in ids.values():
        assert wait_status(client, request_id, {"succeeded", "failed"}, 60)["status"] == "succeeded"
    served_by = {name: orch.store.load_job(i).miner_hotkey for name, i in ids.items()}
    assert served_by == {
        "tiny": tiny_miner.hotkey,
        "kontext-generate": kontext_miner.hotkey,
        "kontext-edit": kontext_miner.hotkey,
    }

    audits = wait_until(lambda: a if len(a := orch.store.list_audits()) == len(ids) else None, 60, "audits")
    for audit in audits:
        job = orch.store.load_job(audit.job_id)
        assert audit.verdict == "pass", audit.evidence
        assert audit.evidence["reference"]["profile"] == job.model
        assert audit.evidence["verdict"]["metrics"]["comparison"] == "exact"

    models = {m["id"]: m for m in client.get("/v1/models").json()}
    assert set(models) == {"tiny", "tiny-kontext"} and models["tiny"]["default"]

    web = httpx.Client(base_url=orch.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)

    def shown() -> dict[str, Any] | None:
        rows = {row["model"]: row for row in web.get("/dashboard/api/state").json()["models"]}
        passed = sum(row["audits"]["pass"] for row in rows.values())
        return rows if passed == len(ids) else None

    rows = wait_until(shown, 10, "per-model statistics")
    assert rows["tiny"]["default"] and rows["tiny"]["miners"] == [tiny_miner.uid]
    assert rows["tiny-kontext"]["miners"] == [kontext_miner.uid]
    assert (rows["tiny"]["jobs"], rows["tiny"]["succeeded"], rows["tiny"]["success_rate"]) == (1, 1, 1.0)
    assert (rows["tiny-kontext"]["jobs"], rows["tiny-kontext"]["audits"]["pass"]) == (2, 2)
    assert rows["tiny-kontext"]["latency"]["p50"] > 0
    assert sum(point["n"] for point in rows["tiny-kontext"]["series"]) == 2
    web.close()
