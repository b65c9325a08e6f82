"""The job state machine is pinned here: changing it should be a deliberate, visible decision."""

from __future__ import annotations

import pytest

from dippy_studio.orchestrator.states import NON_TERMINAL, TERMINAL, RequestStatus, can_transition

EXPECTED = {
    ("queued", "dispatched"),
    ("queued", "failed"),
    ("queued", "canceled"),
    ("dispatched", "running"),
    ("dispatched", "queued"),
    ("dispatched", "succeeded"),
    ("dispatched", "failed"),
    ("dispatched", "canceled"),
    ("running", "queued"),
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "canceled"),
}


def test_statuses_are_the_six_the_api_documents():
    assert [s.value for s in RequestStatus] == ["queued", "dispatched", "running", "succeeded", "failed", "canceled"]
    assert {s.value for s in TERMINAL} == {"succeeded", "failed", "canceled"}


@pytest.mark.parametrize("frm", [s.value for s in RequestStatus])
@pytest.mark.parametrize("to", [s.value for s in RequestStatus])
def test_transition_table(frm: str, to: str):
    assert can_transition(frm, to) == ((frm, to) in EXPECTED)


def test_terminal_states_are_final_and_every_live_state_can_be_canceled():
    for done in TERMINAL:
        assert not any(can_transition(done, to) for to in RequestStatus)
    for live in NON_TERMINAL:
        assert can_transition(live, RequestStatus.canceled)


def test_unknown_states_are_never_allowed():
    assert not can_transition("queued", "expired")
    assert not can_transition("bogus", "queued")
