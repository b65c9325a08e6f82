"""The services do what their OpenAPI schemas say.

schemathesis reads each app's /openapi.json and runs its phases against the app in-process
(ASGI): the schema's boundary and invalid values, methods a path does not serve, then generated
requests for the rest of a time budget. Every answer must be documented for its route (status
code, content type, body schema, headers), never a 5xx, and a 405 must name every method its
path serves. The orchestrator gets a live API key and the miner's requests are signed by an
admitted hotkey, so the authenticated routes run past their key and signature checks.

Nothing leaves the process: name resolution is off for these tests, so every URL a generated
request names (webhooks, LoRAs, datasets, callbacks) is refused as unresolvable before anything
is sent.
"""

from __future__ import annotations

import socket
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events, from_schema
from schemathesis.python import asgi

from dippy_studio.miner.app import create_app as create_miner_app
from dippy_studio.miner.store import JobRecord
from dippy_studio.miner.workers import AbortCheck, Outcome
from dippy_studio.orchestrator.app import create_app as create_orchestrator_app
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.protocol.auth import sign_request
from dippy_studio.protocol.limits import PROFILE_LIMITS, SIZE_MULTIPLE
from miner_kit import MINER, ORCHESTRATOR, miner_settings

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "unsupported_method",
    "allow_header_conformance",
]
# Seconds per app (about 5 of them for the schema's boundary values and unserved methods, sent
# first); generated requests fill the rest.
BUDGET_S = 12
# The dashboard's routes are in the schema only with an operator token set.
DASHBOARD_TOKEN = "operator-token-for-schemathesis"


def config(**extra: Any) -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "max-time": BUDGET_S,
            # The same sequence of requests on every run (cut where the budget ends), so a failure reproduces.
            "seed": 15,
            "workers": 1,
            # An event stream (the dashboard's) is checked on its first event, not held open.
            "max-stream-events": 1,
            "generation": {"mode": "all", "max-examples": 10, "database": "none"},
            "phases": {"stateful": {"enabled": False}},
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
            **extra,
        }
    )


@dataclass
class Run:
    """What one schemathesis run found: failures by operation and check, and the statuses seen."""

    spec: dict[str, Any]
    failures: dict[str, str] = field(default_factory=dict)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def report(self) -> str:
        return "\n\n".join([*self.failures.values(), *self.errors])

    def refusal_shapes(self) -> set[str]:
        """The JSON schemas the documented 4xx answers name ('none' for one without)."""
        return {
            response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "none").split("/")[-1]
            for operations in self.spec["paths"].values()
            for operation in operations.values()
            for status, response in operation["responses"].items()
            if status.startswith("4")
        }

    def answered(self, operation: str, statuses: range) -> int:
        return sum(n for (label, status), n in self.statuses.items() if label == operation and status in statuses)


def run_schemathesis(app: Any, settings: SchemathesisConfig) -> Run:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=settings)
    run = Run(schema.raw_schema)
    try:
        for event in from_schema(schema).execute():
            if isinstance(event, events.ScenarioFinished):
                recorder = event.recorder
                for interaction in recorder.interactions.values():
                    if interaction.response is not None:
                        run.statuses[recorder.label, interaction.response.status_code] += 1
                for check in (check for checks in recorder.checks.values() for check in checks):
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        run.failures.setdefault(
                            f"{recorder.label} {check.name}",
                            f"{recorder.label}: {failure.title}\n{failure.message}\n{check.failure_info.code_sample}",
                        )
            elif isinstance(event, events.NonFatalError | events.FatalError):
                run.errors.append(f"{type(event).__name__}: {getattr(event, 'value', event)!r}")
    finally:
        # from_asgi started the app's lifespan (its loops and threads); stop it with the run.
        asgi.shutdown_lifespans()
    return run


@pytest.fixture(autouse=True)
def no_name_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(host: Any, *args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, f"{host}: name resolution is off in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def orchestrator_app(tmp_path: Path) -> Any:
    settings = OrchestratorSettings(data_dir=tmp_path / "orch", profile="tiny", dashboard_token=DASHBOARD_TOKEN)
    return create_orchestrator_app(settings, signer=ORCHESTRATOR)


def test_orchestrator_answers_as_its_schema_says(orchestrator_app: Any) -> None:
    store = orchestrator_app.state.orchestrator.store
    secret = store.create_api_key("schemathesis", rate_limit_per_minute=10**7).secret
    # /ready answers 503 while no miner is healthy (none is, here): that is its documented answer.
    ready = {"include-path": "/ready", "checks": {"not_a_server_error": {"expected-statuses": ["2XX", "4XX", 503]}}}
    operator = {"include-path-regex": "^/dashboard/", "headers": {"Authorization": f"Bearer {DASHBOARD_TOKEN}"}}
    # The OpenAI-compatible calls wait for their images: with no miner they answer 503, as documented.
    openai = {
        "include-path-regex": "^/v1/images/(generations|edits)$",
        "checks": {"not_a_server_error": {"expected-statuses": ["2XX", "4XX", 503]}},
    }
    run = run_schemathesis(
        orchestrator_app, config(headers={"Authorization": f"Bearer {secret}"}, operations=[ready, openai, operator])
    )
    assert not run.failures and not run.errors, run.report()
    assert run.refusal_shapes() == {"ErrorBody"}
    # The key worked: authenticated routes answered past it.
    assert run.answered("GET /v1/requests", range(200, 300)), run.statuses
    assert run.answered("POST /v1/images", range(200, 300)), run.statuses
    # ... and so did the operator token, on the dashboard's.
    assert run.answered("GET /dashboard/api/state", range(200, 300)), run.statuses


def _instant(tmp_path: Path):
    """A lane that finishes every job at once, so generated jobs cost no model time."""

    def run(record: JobRecord, check: AbortCheck) -> Outcome:
        path = tmp_path / f"{record.job_id}.bin"
        path.write_bytes(b"result")
        return Outcome(str(path), "0" * 64, 6, "instant")

    return run


def signed_by_orchestrator(app: Any) -> Any:
    """The miner app behind a front that signs every request as the orchestrator does, over the
    exact body and target sent: what generated requests lack to reach the signed routes."""

    async def front(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        target = scope["raw_path"].decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        signature = sign_request(ORCHESTRATOR, scope["method"], target, body, MINER.ss58_address)
        headers = [(name.lower().encode(), value.encode()) for name, value in signature.items()]
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await app({**scope, "headers": [*scope["headers"], *headers]}, replay, send)

    return front


def test_miner_answers_as_its_schema_says(tmp_path: Path, tiny_engine: Any) -> None:
    app = create_miner_app(
        miner_settings(tmp_path, allow_loopback_urls=False),
        engine=tiny_engine,
        inference_runner=_instant(tmp_path),
        training_runner=_instant(tmp_path),
    )
    run = run_schemathesis(signed_by_orchestrator(app), config())
    assert not run.failures and not run.errors, run.report()
    assert run.refusal_shapes() == {"ErrorBody"}
    # The signature worked: signed routes answered past it.
    assert run.answered("GET /v1/capacity", range(200, 300)), run.statuses
    assert not [key for key in run.statuses if key[1] in (401, 403)], run.statuses


def test_the_schema_states_the_image_limits(orchestrator_app: Any) -> None:
    """A client reading the schema learns the size rule and the largest size any profile serves,
    so it does not send what every orchestrator refuses."""
    spec = TestClient(orchestrator_app).get("/openapi.json").json()
    for side in ("width", "height"):
        # Optional (the image tasks' output follows the input image): an integer or null.
        [schema] = [
            s
            for s in spec["components"]["schemas"]["ImageRequest"]["properties"][side]["anyOf"]
            if s["type"] == "integer"
        ]
        assert schema["multipleOf"] == SIZE_MULTIPLE
        assert schema["maximum"] == max(limits.max_side for limits in PROFILE_LIMITS.values())


def test_refusals_have_one_shape(orchestrator_app: Any) -> None:
    """A person reads `detail`; a program reads `errors` (validation) or `Allow` (405)."""
    secret = orchestrator_app.state.orchestrator.store.create_api_key("shape").secret
    with TestClient(orchestrator_app, headers={"Authorization": f"Bearer {secret}"}) as client:
        invalid = client.post("/v1/images", json={"prompt": "a cat", "width": 65, "height": 64})
        assert invalid.status_code == 422
        body = invalid.json()
        reason = "Value error, 65 is not a multiple of 16"
        assert body == {
            "detail": f"body.width: {reason}",
            "errors": [{"loc": ["body", "width"], "msg": reason, "type": "value_error"}],
        }
        unknown = client.get("/v1/requests/req_nope")
        assert unknown.status_code == 404 and unknown.json() == {"detail": "no request req_nope"}
        wrong_method = client.delete("/v1/loras")
        assert wrong_method.status_code == 405 and wrong_method.json() == {"detail": "Method Not Allowed"}
        assert wrong_method.headers["allow"] == "GET, POST"
