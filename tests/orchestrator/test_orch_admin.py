"""The operator's admin API (keys, quotas, usage) behind DIPPY_ORCH_ADMIN_TOKEN, a client's
GET /v1/usage and 402 for a spent quota, and the same through `dippy-studio orchestrator keys`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from dippy_studio.orchestrator.admin_api import ADMIN_OFF
from dippy_studio.orchestrator.app import create_app
from dippy_studio.orchestrator.cli import orchestrator_app
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.protocol import signer_from_uri

TOKEN = "admin-token-for-the-tests"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
IMAGE = {"prompt": "a lighthouse", "seed": 1, "width": 64, "height": 64, "steps": 2}


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(**settings: Any) -> TestClient:
        values = OrchestratorSettings(data_dir=tmp_path / f"orch{len(clients)}", audit=False, **settings)
        client = TestClient(create_app(values, signer=signer_from_uri("//Alice")))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_the_admin_api_is_off_until_a_token_is_set(make_client):
    client = make_client()
    for method, path in (("GET", "/v1/admin/keys"), ("POST", "/v1/admin/keys/key_0123456789abcdef/revoke")):
        reply = client.request(method, path, headers=ADMIN)
        assert reply.status_code == 404
        assert reply.json() == {"detail": ADMIN_OFF}
    assert "/v1/admin/keys" not in client.get("/openapi.json").json()["paths"]


def test_the_admin_api_answers_only_to_its_token(make_client):
    client = make_client(admin_token=TOKEN)
    assert client.get("/v1/admin/keys").status_code == 401
    wrong = client.get("/v1/admin/keys", headers={"Authorization": "Bearer not-the-admin-token"})
    assert wrong.status_code == 401 and "wrong or missing admin token" in wrong.json()["detail"]
    # An API key is no admin token.
    secret = client.post("/v1/admin/keys", json={"name": "builder"}, headers=ADMIN).json()["secret"]
    assert client.get("/v1/admin/keys", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    assert client.get("/v1/admin/keys", headers=ADMIN).status_code == 200


def test_key_ids_and_names_no_database_can_hold_are_refused_not_crashed(make_client, db_url: str):
    client = make_client(admin_token=TOKEN, db_url=db_url)
    for method, path in (
        ("GET", "/v1/admin/keys/key_%00"),
        ("POST", "/v1/admin/keys/key_%00/revoke"),
        ("GET", "/v1/admin/keys/key_%00/usage"),
    ):
        refused = client.request(method, path, headers=ADMIN)
        assert refused.status_code == 422 and refused.json()["detail"].startswith("path.key_id"), refused.text
    named = client.post("/v1/admin/keys", json={"name": "build\x00er"}, headers=ADMIN)
    assert named.status_code == 422 and "control character" in named.json()["detail"], named.text
    assert client.post("/v1/admin/keys", json={"name": "builder"}, headers=ADMIN).status_code == 201
    assert [key["name"] for key in client.get("/v1/admin/keys", headers=ADMIN).json()] == ["builder"]


def test_keys_quotas_and_usage_through_the_admin_api(make_client):
    client = make_client(admin_token=TOKEN, allow_loopback_urls=True)
    made = client.post("/v1/admin/keys", json={"name": "builder", "rate_limit_per_minute": 30}, headers=ADMIN)
    assert made.status_code == 201, made.text
    created = made.json()
    key_id, secret = created["key"]["id"], created["secret"]
    assert secret.startswith("dsk_") and created["webhook_secret"].startswith("whsec_")
    assert created["key"]["quota"] is None and created["key"]["rate_limit_per_minute"] == 30
    listed = client.get("/v1/admin/keys", headers=ADMIN).json()
    assert [k["id"] for k in listed] == [key_id] and secret not in json.dumps(listed)

    client_auth = {"Authorization": f"Bearer {secret}"}
    assert client.post("/v1/images", json=IMAGE, headers=client_auth).status_code == 202

    # No image left today: the next one is refused with 402 in the API's one error shape.
    quota = client.put(f"/v1/admin/keys/{key_id}/quota", json={"day": {"images": 1}}, headers=ADMIN)
    assert quota.status_code == 200 and quota.json()["quota"]["day"]["images"] == 1
    spent = client.post("/v1/images", json=IMAGE, headers=client_auth)
    assert spent.status_code == 402, spent.text
    assert list(spent.json()) == ["detail"]
    assert "daily quota of 1 images reached" in spent.json()["detail"]
    assert "1 held by unfinished requests" in spent.json()["detail"]
    # Also where the job is built before it is inserted (a webhook URL is checked first).
    hooked = client.post("/v1/images", json={**IMAGE, "webhook_url": "http://127.0.0.1:9/hook"}, headers=client_auth)
    assert hooked.status_code == 402, hooked.text

    usage = client.get("/v1/usage", params={"days": 2}, headers=client_auth)
    assert usage.status_code == 200
    assert usage.json()["key_id"] == key_id and len(usage.json()["days"]) == 2
    assert usage.json()["quota"]["day"]["images"] == 1
    assert client.get(f"/v1/admin/keys/{key_id}/usage", params={"days": 2}, headers=ADMIN).json() == usage.json()
    assert client.get("/v1/usage", params={"days": 0}, headers=client_auth).status_code == 422

    # Raised, it admits again; `{}` removes every limit.
    client.put(f"/v1/admin/keys/{key_id}/quota", json={"day": {"images": 2}}, headers=ADMIN)
    assert client.post("/v1/images", json=IMAGE, headers=client_auth).status_code == 202
    cleared = client.put(f"/v1/admin/keys/{key_id}/quota", json={}, headers=ADMIN)
    assert cleared.json()["quota"] is None
    bad = client.put(f"/v1/admin/keys/{key_id}/quota", json={"day": {"images": -1}}, headers=ADMIN)
    assert bad.status_code == 422

    revoked = client.post(f"/v1/admin/keys/{key_id}/revoke", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert client.get("/v1/usage", headers=client_auth).status_code == 401
    for method, path in (("GET", "/keys/key_0123456789abcdef"), ("POST", "/keys/key_0123456789abcdef/revoke")):
        unknown = client.request(method, f"/v1/admin{path}", headers=ADMIN)
        assert unknown.status_code == 404 and "no API key" in unknown.json()["detail"]


def test_keys_quota_and_usage_on_the_command_line(tmp_path: Path):
    runner = CliRunner()

    def keys(*args: str) -> Any:
        result = runner.invoke(orchestrator_app, ["keys", *args, "--data-dir", str(tmp_path)])
        return result

    made = keys("create", "--name", "acme", "--json")
    assert made.exit_code == 0, made.output
    key_id = json.loads(made.stdout)["id"]
    assert "no quota" in keys("quota", key_id).stdout

    changed = keys("quota", key_id, "--day", "images=100", "--month", "megapixel_steps=2.5", "--json")
    assert changed.exit_code == 0, changed.output
    assert json.loads(changed.stdout)["quota"]["day"]["images"] == 100
    # The limits given replace those of their unit; the others stay.
    again = json.loads(keys("quota", key_id, "--day", "training_steps=500", "--json").stdout)["quota"]
    assert again["day"] == {"images": 100, "megapixel_steps": None, "training_steps": 500}
    assert again["month"]["megapixel_steps"] == 2.5
    shown = keys("quota", key_id).stdout
    assert "per day (UTC): 100 images, 500 training_steps" in shown and "2.5 megapixel_steps" in shown
    assert json.loads(keys("list", "--json").stdout)[0]["quota"]["day"]["images"] == 100

    bad = keys("quota", key_id, "--day", "pixels=3")
    assert bad.exit_code == 2 and "expected UNIT=N" in bad.output
    assert keys("quota", key_id, "--day", "images=-1").exit_code == 2
    assert json.loads(keys("quota", key_id, "--clear", "--json").stdout)["quota"] is None

    usage = json.loads(keys("usage", key_id, "--days", "3", "--json").stdout)
    assert usage["key_id"] == key_id and [d["images"] for d in usage["days"]] == [0, 0, 0]
    assert keys("usage", "key_0123456789abcdef").exit_code == 1
