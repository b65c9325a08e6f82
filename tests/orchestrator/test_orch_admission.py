"""Refused requests are cheap: a key over its limit or a secret that is no key is refused from
memory, without a turn of the database writer that every other client's requests wait for."""

from __future__ import annotations

import pytest

import orchestrator.test_orch_api as api_kit
from dippy_studio.orchestrator.admission import Refusals
from dippy_studio.orchestrator.errors import InvalidRequest, RateLimited, Unauthorized
from orchestrator.orch_kit import image_body

make_api, api = api_kit.make_api, api_kit.api  # fixtures: an orchestrator app with no miners

BAD_SECRET = {"Authorization": "Bearer dsk_0000000000000000_" + "x" * 43}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_rate_limit_is_remembered_until_its_window_ends():
    clock = Clock()
    refusals = Refusals(clock)
    refusals.check("dsk_a")  # nothing remembered yet
    refusals.remember("dsk_a", RateLimited("limit of 3 requests per minute reached", 20.0))
    clock.now += 5
    with pytest.raises(RateLimited, match="3 requests per minute") as refused:
        refusals.check("dsk_a")
    assert refused.value.retry_after == pytest.approx(15.0)
    refusals.check("dsk_b")  # other keys are untouched
    clock.now += 15
    refusals.check("dsk_a")  # the next window is open


def test_unknown_secrets_are_remembered_for_a_while_and_client_mistakes_never():
    clock = Clock()
    refusals = Refusals(clock, unknown_ttl_s=30.0, max_entries=2)
    refusals.remember("dsk_x", Unauthorized("invalid or revoked API key"))
    refusals.remember("dsk_y", InvalidRequest("steps 99 is over 50"))  # about the request, not the caller
    with pytest.raises(Unauthorized, match="invalid or revoked"):
        refusals.check("dsk_x")
    refusals.check("dsk_y")
    with pytest.raises(Unauthorized, match="missing Authorization"):
        refusals.check(None)
    clock.now += 31
    refusals.check("dsk_x")


def test_memory_is_bounded_least_recently_used_first():
    refusals = Refusals(Clock(), max_entries=2)
    for secret in ("dsk_1", "dsk_2", "dsk_3"):
        refusals.remember(secret, Unauthorized("invalid or revoked API key"))
    refusals.check("dsk_1")  # dropped: the oldest
    for secret in ("dsk_2", "dsk_3"):
        with pytest.raises(Unauthorized):
            refusals.check(secret)


def test_repeated_refusals_take_no_turn_of_the_writer(api):
    limited = api.key(rate=2)
    assert [api.call("GET", "/v1/requests", limited).status_code for _ in range(2)] == [200, 200]
    assert api.call("GET", "/v1/requests", limited).status_code == 429
    assert api.call("GET", "/v1/requests", BAD_SECRET).status_code == 401
    writes = api.orch.store.writer.groups
    answers = [api.call("GET", "/v1/requests", limited) for _ in range(20)]
    answers += [api.call("POST", "/v1/images", limited, json=image_body()) for _ in range(20)]
    answers += [api.call("POST", "/v1/loras", limited, data={"trigger_word": "zx"}) for _ in range(5)]
    answers += [api.call("POST", "/v1/images", BAD_SECRET, json=image_body()) for _ in range(20)]
    assert [a.status_code for a in answers] == [429] * 45 + [401] * 20
    assert all("2 requests per minute" in a.json()["detail"] for a in answers[:45])
    assert all(1 <= int(a.headers["retry-after"]) <= 60 for a in answers[:45])
    assert api.orch.store.writer.groups == writes, "refusals went through the database writer"
    assert api.call("GET", "/v1/requests", api.key()).status_code == 200  # other keys are served


def test_a_revoked_key_is_refused_at_once(api):
    key = api.key()
    assert api.call("GET", "/v1/requests", key).status_code == 200
    assert api.orch.store.revoke_api_key(key["id"])
    refused = api.call("GET", "/v1/requests", key)
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
