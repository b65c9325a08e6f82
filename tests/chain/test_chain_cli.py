"""`dippy-studio chain ...`: the commands on a local chain, their errors, and --network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from chain.chain_support import ALICE, BOB, CHARLIE
from dippy_studio.chain import BittensorChain, LocalChain
from dippy_studio.chain import cli as chain_cli
from dippy_studio.chain.cli import chain_app, resolve_address

app = typer.Typer()
app.add_typer(chain_app, name="chain")
runner = CliRunner()


def chain(*args: str):
    return runner.invoke(app, ["chain", *args])


@pytest.fixture
def data_dir(tmp_path: Path) -> str:
    directory = tmp_path / "dippy"
    result = chain("init", "--data-dir", str(directory), "--block-time", "0.05", "--min-validator-stake", "10")
    assert result.exit_code == 0, result.output
    return str(directory)


def test_init_creates_the_chain_file_and_refuses_to_overwrite(data_dir: str) -> None:
    assert (Path(data_dir) / "chain.sqlite").exists()
    again = chain("init", "--data-dir", data_dir)
    assert again.exit_code == 1
    assert "exists" in again.stderr
    reset = chain("init", "--data-dir", data_dir, "--reset", "--tempo", "5", "--json")
    assert reset.exit_code == 0
    assert json.loads(reset.stdout)["hyperparameters"]["tempo"] == 5


def test_register_stake_commit_and_read_the_metagraph(data_dir: str) -> None:
    first = chain("register", "//Alice", "--data-dir", data_dir)
    assert first.exit_code == 0
    assert f"registered {ALICE} as uid 0" in first.stdout
    assert chain("register", BOB, "--coldkey", "//Charlie", "--data-dir", data_dir).exit_code == 0
    again = chain("register", "//Alice", "--data-dir", data_dir, "--json")
    assert again.exit_code == 0
    assert json.loads(again.stdout) == {"hotkey": ALICE, "coldkey": ALICE, "uid": 0, "already_registered": True}

    staked = chain("stake", "//Alice", "25", "--data-dir", data_dir)
    assert staked.exit_code == 0
    assert "now holds 25" in staked.stdout
    assert chain("commit-endpoint", "//Bob", "http://127.0.0.1:8001", "--data-dir", data_dir).exit_code == 0

    table = chain("metagraph", "--data-dir", data_dir)
    assert table.exit_code == 0
    assert "http://127.0.0.1:8001" in table.stdout
    graph = json.loads(chain("metagraph", "--data-dir", data_dir, "--json").stdout)
    assert [(n["uid"], n["hotkey"], n["coldkey"]) for n in graph["neurons"]] == [(0, ALICE, ALICE), (1, BOB, CHARLIE)]
    assert [n["stake"] for n in graph["neurons"]] == [25.0, 0.0]
    assert [n["validator_permit"] for n in graph["neurons"]] == [True, False]
    assert graph["neurons"][1]["commitment"] == "http://127.0.0.1:8001"


def test_weights_and_emissions_show_what_validators_set(data_dir: str) -> None:
    for key in ("//Alice", "//Bob", "//Charlie"):
        chain("register", key, "--data-dir", data_dir)
    chain("stake", "//Alice", "100", "--data-dir", data_dir)
    assert "no weights set" in chain("weights", "--data-dir", data_dir).stdout

    LocalChain(Path(data_dir) / "chain.sqlite").set_weights(ALICE, [1, 2], [3.0, 1.0])
    rows = json.loads(chain("weights", "--data-dir", data_dir, "--json").stdout)["weights"]
    assert rows["0"] == pytest.approx({"1": 0.75, "2": 0.25}, abs=1e-4)
    table = chain("weights", "--data-dir", data_dir)
    assert "0.7500" in table.stdout

    report = json.loads(chain("emissions", "--data-dir", data_dir, "--json").stdout)
    assert report["epoch"]["next_epoch_block"] == 360
    assert [n["uid"] for n in report["neurons"]] == [0, 1, 2]
    assert "emissions" in chain("emissions", "--data-dir", data_dir).stdout


def test_a_missing_chain_says_how_to_create_one(tmp_path: Path) -> None:
    result = chain("metagraph", "--data-dir", str(tmp_path / "nowhere"))
    assert result.exit_code == 1
    assert "chain init" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["register", "not-a-key"], "neither an ss58 address"),
        (["commit-endpoint", "//Bob", "ftp://x"], "not an http(s) URL"),
        (["stake", "//Alice", "0"], "positive"),
        (["register"], "say which hotkey"),
    ],
)
def test_bad_input_exits_2(data_dir: str, args: list[str], message: str) -> None:
    result = chain(*args, "--data-dir", data_dir)
    assert result.exit_code == 2
    assert message in result.stderr


def test_chain_refusals_exit_1(data_dir: str) -> None:
    result = chain("stake", "//Alice", "3", "--data-dir", data_dir)
    assert result.exit_code == 1
    assert "not registered" in result.stderr


def test_network_needs_a_netuid() -> None:
    result = chain("metagraph", "--network", "test")
    assert result.exit_code == 2
    assert "--netuid" in result.stderr


def test_network_reads_go_through_bittensor_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    from chain.test_bittensor_chain import FakeClient

    opened = []

    def fake_chain(network: str, netuid: int, wallet=None) -> BittensorChain:
        opened.append((network, netuid, wallet))
        return BittensorChain(network, netuid, wallet, client=FakeClient())

    monkeypatch.setattr(chain_cli, "BittensorChain", fake_chain)
    result = chain("metagraph", "--network", "test", "--netuid", "7", "--json")
    assert result.exit_code == 0, result.output
    assert opened == [("test", 7, None)]
    assert json.loads(result.stdout)["neurons"][1]["commitment"] == "http://1.2.3.4:8000"
    emissions = json.loads(chain("emissions", "--network", "test", "--netuid", "7", "--json").stdout)
    assert emissions["epoch"] is None
    assert emissions["neurons"][0]["total_emission"] is None


def test_resolve_address_accepts_uris_and_ss58() -> None:
    assert resolve_address("//Alice") == ALICE
    assert resolve_address(ALICE) == ALICE
    with pytest.raises(ValueError):
        resolve_address("")


@pytest.mark.parametrize(
    "bad",
    [["--max-weight-limit", "2"], ["--block-time", "-1"], ["--tempo", "-1"], ["--emission-per-block", "nan"]],
)
def test_a_reset_with_bad_parameters_keeps_the_existing_chain(data_dir: str, bad: list[str]) -> None:
    assert chain("register", "//Alice", "--data-dir", data_dir).exit_code == 0
    result = chain("init", "--data-dir", data_dir, "--reset", *bad)
    assert result.exit_code == 2, result.output
    after = chain("metagraph", "--data-dir", data_dir, "--json")
    assert after.exit_code == 0, after.output
    assert [n["hotkey"] for n in json.loads(after.stdout)["neurons"]] == [ALICE]
    assert sorted(p.name for p in Path(data_dir).iterdir() if not p.name.startswith("chain.sqlite-")) == [
        "chain.sqlite"
    ]


def test_a_reset_replaces_the_chain_with_a_new_one(data_dir: str) -> None:
    assert chain("register", "//Alice", "--data-dir", data_dir).exit_code == 0
    reset = chain("init", "--data-dir", data_dir, "--reset", "--block-time", "0.5")
    assert reset.exit_code == 0, reset.output
    graph = json.loads(chain("metagraph", "--data-dir", data_dir, "--json").stdout)
    assert graph["neurons"] == []
    assert LocalChain(Path(data_dir) / "chain.sqlite", create=False).block_time == 0.5


@pytest.mark.parametrize(
    ("sql", "said"),
    [
        ("UPDATE meta SET value = '{bad' WHERE key = 'hyperparameters'", "hyperparameters"),
        ("UPDATE meta SET value = '{\"foo\": 1}' WHERE key = 'hyperparameters'", "hyperparameters"),
        ("UPDATE meta SET value = 'abc' WHERE key = 'genesis'", "genesis"),
        ("UPDATE meta SET value = '0' WHERE key = 'block_time'", "block_time"),
        ("DELETE FROM meta WHERE key = 'genesis'", "genesis"),
    ],
)
def test_a_chain_with_corrupt_parameters_is_reported_not_repaired(data_dir: str, sql: str, said: str) -> None:
    import sqlite3

    path = Path(data_dir) / "chain.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute(sql)
    before = dict(sqlite3.connect(path).execute("SELECT key, value FROM meta").fetchall())
    result = chain("metagraph", "--data-dir", data_dir)
    # A message and exit 1, not a traceback (which CliRunner also reports as exit 1).
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert f"{path} is corrupt" in result.stderr and said in result.stderr
    # Never quietly given a new genesis or new parameters: the operator decides.
    assert dict(sqlite3.connect(path).execute("SELECT key, value FROM meta").fetchall()) == before
