"""Validator settings: flags over DIPPY_VALIDATOR_* over a TOML file over defaults, and a local
subnet's subnet.json filling only what none of them gave."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dippy_studio.validator.cli import _from_subnet_file, validator_app
from dippy_studio.validator.settings import ValidatorSettings
from dippy_studio.validator.weights import DEFAULT_EMA_ALPHA


def test_flags_beat_env_which_beats_the_file(tmp_path, monkeypatch):
    config = tmp_path / "validator.toml"
    config.write_text('alpha = 0.3\nburn_share = 0.2\norchestrator_url = "http://file:8090"\n')
    monkeypatch.setenv("DIPPY_VALIDATOR_ALPHA", "0.4")
    settings = ValidatorSettings.load(config)
    assert settings.alpha == 0.4 and settings.burn_share == 0.2
    assert settings.orchestrator_url == "http://file:8090"
    assert settings.max_scores_age_s == 3600.0  # the class default
    assert ValidatorSettings.load(config, alpha=0.5, burn_share=None).alpha == 0.5
    monkeypatch.delenv("DIPPY_VALIDATOR_ALPHA")
    assert ValidatorSettings.load().alpha == DEFAULT_EMA_ALPHA
    with pytest.raises(ValueError, match="does not exist"):
        ValidatorSettings.load(tmp_path / "missing.toml")


def test_subnet_file_fills_only_what_is_unset(tmp_path):
    local = {"orchestrator_url": "http://127.0.0.1:9000", "orchestrator_hotkey": "5Orch", "validator_wallet": "v"}
    unset = ValidatorSettings.load(data_dir=tmp_path)
    assert _from_subnet_file(unset, local) == {
        "orchestrator_url": "http://127.0.0.1:9000",
        "orchestrator_hotkey": "5Orch",
        "wallet_name": "v",
        "wallet_path": tmp_path / "wallets",
    }
    given = ValidatorSettings.load(data_dir=tmp_path, orchestrator_url="http://elsewhere", dev_key="//Alice")
    assert _from_subnet_file(given, local) == {"orchestrator_hotkey": "5Orch"}


def test_cli_refuses_bad_settings_clearly(tmp_path):
    runner = CliRunner()
    (tmp_path / "subnet.json").write_text(json.dumps({"orchestrator_url": "http://127.0.0.1:1"}))
    # One command: typer runs `validator run` as the app itself.
    common = ["--once", "--data-dir", str(tmp_path)]
    bad_alpha = runner.invoke(validator_app, [*common, "--alpha", "0"])
    assert bad_alpha.exit_code == 2 and "alpha" in bad_alpha.output
    no_file = runner.invoke(validator_app, [*common, "--config", str(tmp_path / "missing.toml")])
    assert no_file.exit_code == 2 and "does not exist" in no_file.output
    no_hotkey = runner.invoke(validator_app, common)
    assert no_hotkey.exit_code == 2 and "--orchestrator-hotkey" in no_hotkey.output


def test_the_validators_own_data_dir_variable_wins_over_the_generic_one(tmp_path, monkeypatch):
    # Only the service's own directory names the orchestrator's hotkey: the error shows which was read.
    for name, local in (("generic", {}), ("own", {"orchestrator_hotkey": "5OwnOrchestrator"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "subnet.json").write_text(json.dumps({"orchestrator_url": "http://127.0.0.1:1", **local}))
    monkeypatch.setenv("DIPPY_DATA_DIR", str(tmp_path / "generic"))
    monkeypatch.delenv("DIPPY_VALIDATOR_ORCHESTRATOR_HOTKEY", raising=False)
    generic = CliRunner().invoke(validator_app, ["--once", "--dry-run"])
    assert generic.exit_code == 2 and "--orchestrator-hotkey" in generic.output
    monkeypatch.setenv("DIPPY_VALIDATOR_DATA_DIR", str(tmp_path / "own"))
    own = CliRunner().invoke(validator_app, ["--once", "--dry-run"])
    # Its subnet.json was read: the hotkey is known, and what is missing now is the validator's key.
    assert own.exit_code == 2 and "no signing key" in own.output and "--orchestrator-hotkey" not in own.output


@pytest.mark.parametrize(
    ("subnet", "said"),
    [
        ("[]", "is not a JSON object"),
        ('{"orchestrator_url": 7}', "orchestrator_url must be a string"),
        ('{"block_time": "abc"}', "block_time must be a positive number of seconds"),
        ('{"block_time": -1}', "block_time must be a positive number of seconds"),
    ],
)
def test_a_subnet_file_of_the_wrong_shape_is_refused_clearly(tmp_path, subnet, said):
    (tmp_path / "subnet.json").write_text(subnet)
    result = CliRunner().invoke(validator_app, ["--once", "--data-dir", str(tmp_path), "--dev-key", "//Alice"])
    assert result.exit_code == 2 and said in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_corrupt_state_file_stops_the_validator_with_its_path(tmp_path):
    from dippy_studio.chain.local import LocalChain

    LocalChain(tmp_path / "chain.sqlite").close()
    (tmp_path / "subnet.json").write_text(
        json.dumps({"orchestrator_url": "http://127.0.0.1:1", "orchestrator_hotkey": "5Orch", "block_time": 1.0})
    )
    state = tmp_path / "state.json"
    state.write_text('{"smoothed": {"0": 0.5')  # cut short
    result = CliRunner().invoke(
        validator_app, ["--once", "--data-dir", str(tmp_path), "--dev-key", "//Alice"],
        env={"DIPPY_VALIDATOR_STATE_PATH": str(state)},
    )  # fmt: skip
    assert result.exit_code == 2 and f"validator state {state} is unreadable" in result.output, result.output
    assert state.read_text() == '{"smoothed": {"0": 0.5'
