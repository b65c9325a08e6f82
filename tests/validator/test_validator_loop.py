"""The validator loop against a real LocalChain and a fake orchestrator over HTTP (MockTransport):
weights are set from signed scores, the EMA moves across rounds, and bad payloads or outages
keep the previous weights."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from chain.chain_support import Clock
from dippy_studio.chain.base import Hyperparameters
from dippy_studio.chain.local import LocalChain
from dippy_studio.protocol import signer_from_uri
from dippy_studio.protocol.auth import sign_request
from dippy_studio.validator import loop
from dippy_studio.validator.loop import Validator
from dippy_studio.validator.settings import ValidatorSettings

VALIDATOR = signer_from_uri("//Alice")
ORCHESTRATOR = signer_from_uri("//Eve")
IMPOSTOR = signer_from_uri("//Ferdie")
MINERS = [signer_from_uri(uri) for uri in ("//Bob", "//Charlie", "//Dave")]


class FakeOrchestrator:
    """Serves GET /v1/scores like the orchestrator: JSON signed for the asking hotkey."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.scores: dict[str, float] = {}
        self.signer = ORCHESTRATOR
        self.mode = "ok"  # ok | unsigned | down | stale | garbage

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.mode == "down":
            raise httpx.ConnectError("connection refused")
        end = datetime.fromtimestamp(self.clock(), UTC) - (timedelta(hours=5) if self.mode == "stale" else timedelta())
        payload = {"scores": self.scores, "window": {"start": (end - timedelta(hours=1)).isoformat(),
                                                     "end": end.isoformat()}}  # fmt: skip
        body = b"{not json" if self.mode == "garbage" else json.dumps(payload).encode()
        receiver = parse_qs(urlsplit(str(request.url)).query)["for"][0]
        target = request.url.raw_path.decode()
        headers = (
            {}
            if self.mode == "unsigned"
            else sign_request(self.signer, "GET", target, body, receiver, now=self.clock())
        )
        return httpx.Response(200, content=body, headers=headers)


@pytest.fixture
def world(tmp_path):
    clock = Clock()
    chain = LocalChain(tmp_path / "chain.sqlite", block_time=1.0, clock=clock,
                       hyperparameters=Hyperparameters(tempo=10, weights_rate_limit=5))  # fmt: skip
    chain.register(VALIDATOR.ss58_address, VALIDATOR.ss58_address)
    chain.add_stake(VALIDATOR.ss58_address, 100.0)
    uids = {m.ss58_address: chain.register(m.ss58_address, m.ss58_address) for m in MINERS}
    orchestrator = FakeOrchestrator(clock)
    http = httpx.Client(base_url="http://orchestrator", transport=httpx.MockTransport(orchestrator))
    settings = ValidatorSettings(orchestrator_url="http://orchestrator", orchestrator_hotkey=ORCHESTRATOR.ss58_address,
                                 state_path=tmp_path / "state.json", alpha=0.5, retries=1, backoff_s=0.0)  # fmt: skip
    validator = Validator(settings, chain, VALIDATOR, http=http, clock=clock)
    return validator, chain, orchestrator, clock, uids


def my_row(chain: LocalChain) -> dict[int, float]:
    return chain.weights().get(chain.metagraph().uid_of(VALIDATOR.ss58_address), {})


def test_sets_weights_from_signed_scores(world):
    validator, chain, orchestrator, _clock, uids = world
    bob, charlie, dave = (m.ss58_address for m in MINERS)
    orchestrator.scores = {bob: 3.0, charlie: 3.0, dave: 0.0, "5Unknown": 9.0}
    report = validator.run_round()
    assert report.action == "set", report.reason
    # The orchestrator's window, an hour ending now, told with its length and its date.
    end = datetime.fromtimestamp(_clock(), UTC)
    assert f"scores of the 1 h ending {end:%Y-%m-%d %H:%M:%S} from 4 miners" in report.reason
    row = my_row(chain)
    # A tie: equal win rates (0 each), equal softmax shares. Zero score: no weight.
    assert row[uids[bob]] == pytest.approx(0.5, abs=1e-4) and row[uids[charlie]] == pytest.approx(0.5, abs=1e-4)
    assert row.get(uids[dave], 0.0) == 0.0


def test_ema_moves_across_rounds_and_survives_restarts(world):
    validator, chain, orchestrator, clock, uids = world
    bob, charlie, _ = (m.ss58_address for m in MINERS)
    orchestrator.scores = {bob: 3.0, charlie: 2.0}
    validator.run_round()
    first = dict(validator.state.smoothed)
    # Win rates 1 and 0: softmax(wr / 0.075) puts e^(1/0.075) (about 6e5) : 1 on bob : charlie.
    assert first[uids[bob]] == pytest.approx(1.0, abs=1e-5)
    orchestrator.scores = {bob: 2.0, charlie: 3.0}  # the ranking flips
    clock.advance_blocks(10)
    restarted = Validator(validator.settings, chain, VALIDATOR, http=validator.http, clock=clock)  # state from disk
    assert restarted.run_round().action == "set"
    second = restarted.state.smoothed
    # alpha 0.5: halfway between last round's weights and the new target, not a reset.
    assert second[uids[bob]] == pytest.approx(0.5 * first[uids[bob]] + 0.5 * first[uids[charlie]], abs=1e-6)
    assert second[uids[charlie]] == pytest.approx(0.5, abs=1e-5)
    clock.advance_blocks(10)
    restarted.run_round()
    assert restarted.state.smoothed[uids[charlie]] == pytest.approx(0.75, abs=1e-5)  # and on toward the target


@pytest.mark.parametrize("mode", ["unsigned", "stale", "garbage", "down", "impostor"])
def test_bad_or_missing_scores_keep_the_previous_weights(world, mode):
    validator, chain, orchestrator, clock, _uids = world
    bob, charlie, _ = (m.ss58_address for m in MINERS)
    orchestrator.scores = {bob: 3.0, charlie: 2.0}
    validator.run_round()
    before_row, before_state = my_row(chain), dict(validator.state.smoothed)
    clock.advance_blocks(10)
    orchestrator.scores = {bob: 0.0, charlie: 0.0}
    if mode == "impostor":
        orchestrator.signer = IMPOSTOR
    else:
        orchestrator.mode = mode
    report = validator.run_round()
    assert report.action == "kept previous", report
    assert my_row(chain) == before_row, "miners must not be zeroed by a bad payload"
    assert validator.state.smoothed == before_state


def test_rate_limit_and_unregistered_validator(world, tmp_path):
    validator, chain, orchestrator, clock, _uids = world
    orchestrator.scores = {MINERS[0].ss58_address: 1.0}
    assert validator.run_round().action == "set"
    waiting = validator.run_round()
    assert waiting.action == "waiting" and "weights_rate_limit" in waiting.reason
    stranger = Validator(validator.settings, chain, signer_from_uri("//Ferdie"), http=validator.http, clock=clock)
    assert "not registered" in stranger.run_round().reason


def test_dry_run_sets_nothing(world):
    validator, chain, orchestrator, _clock, _uids = world
    orchestrator.scores = {MINERS[0].ss58_address: 1.0, MINERS[1].ss58_address: 0.5}
    report = validator.run_round(dry_run=True)
    assert report.action == "dry run" and report.weights
    assert my_row(chain) == {}


@pytest.mark.parametrize(
    ("length", "said"),
    [(timedelta(hours=24), "24 h"), (timedelta(minutes=90), "1.5 h"), (timedelta(minutes=30), "30 min"),
     (timedelta(seconds=45), "45 s")],
)  # fmt: skip
def test_a_scoring_window_is_told_by_its_length(length, said):
    assert loop._span(length) == said


def _serve_raw(validator: Validator, clock: Clock, body_of) -> None:
    """Answer /v1/scores with `body_of(window_end_iso)`, signed by the real orchestrator."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = body_of(datetime.fromtimestamp(clock(), UTC).isoformat()).encode()
        receiver = parse_qs(urlsplit(str(request.url)).query)["for"][0]
        headers = sign_request(ORCHESTRATOR, "GET", request.url.raw_path.decode(), body, receiver, now=clock())
        return httpx.Response(200, content=body, headers=headers)

    validator.http = httpx.Client(base_url="http://orchestrator", transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    ("body_of", "said"),
    [
        # A number json reads as an int too large for a float.
        (lambda end: f'{{"scores": {{"{MINERS[0].ss58_address}": 1{"0" * 400}}}, '
                     f'"window": {{"start": "{end}", "end": "{end}"}}}}', "OverflowError"),
        # Nesting deeper than the JSON decoder's recursion limit.
        (lambda end: '{"scores": ' + "[" * 100_000 + "]" * 100_000 + "}", "RecursionError"),
    ],
    ids=["huge-int", "deep-nesting"],
)  # fmt: skip
def test_a_payload_python_cannot_read_keeps_the_previous_weights(world, body_of, said):
    validator, chain, orchestrator, clock, _uids = world
    orchestrator.scores = {MINERS[0].ss58_address: 3.0, MINERS[1].ss58_address: 2.0}
    validator.run_round()
    before_row, before_state = my_row(chain), dict(validator.state.smoothed)
    clock.advance_blocks(10)
    _serve_raw(validator, clock, body_of)
    report = validator.run_round()
    assert report.action == "kept previous" and "malformed scores payload" in report.reason and said in report.reason
    assert my_row(chain) == before_row and validator.state.smoothed == before_state


def test_the_loop_goes_on_after_a_round_that_failed_unexpectedly(world, tmp_path):
    validator, _chain, orchestrator, _clock, _uids = world
    orchestrator.scores = {MINERS[0].ss58_address: 1.0}
    # The state cannot be saved: its directory is a file.
    (tmp_path / "blocked").write_text("")
    validator.state_path = tmp_path / "blocked" / "state.json"
    reports = []
    validator.run_forever(0.001, reports.append, stop=lambda: len(reports) >= 2)
    # The first round set weights, then could not save its state; the loop went on to the next.
    assert reports[0].action == "failed" and "round failed: FileExistsError" in reports[0].reason
    assert len(reports) == 2


@pytest.mark.parametrize("text", ['{"smoothed": {"0": 0.5', '{"smoothed": [1]}', "[]", '{"chain": {"0": "x"}}'])
def test_an_unreadable_state_file_is_named_not_a_traceback(world, text):
    validator, chain, _orchestrator, clock, _uids = world
    validator.state_path.write_text(text)
    with pytest.raises(loop.StateError, match=f"validator state {validator.state_path} is unreadable"):
        Validator(validator.settings, chain, VALIDATOR, http=validator.http, clock=clock)
    assert validator.state_path.read_text() == text, "the operator's file is left as it was"
