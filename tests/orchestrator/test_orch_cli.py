"""`dippy-studio orchestrator keys ...` against the same database the server uses."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dippy_studio.orchestrator.cli import orchestrator_app
from dippy_studio.orchestrator.db import error_reason
from dippy_studio.orchestrator.errors import Unauthorized
from dippy_studio.orchestrator.store import Store

runner = CliRunner()


def keys(*args: str):
    return runner.invoke(orchestrator_app, ["keys", *args])


def test_create_list_revoke_on_the_servers_database(db_url: str):
    made = keys("create", "--name", "acme app", "--rate-limit", "120", "--json", "--db", db_url)
    assert made.exit_code == 0, made.output
    created = json.loads(made.stdout)
    assert created["key"].startswith("dsk_") and created["webhook_secret"].startswith("whsec_")
    assert (created["name"], created["rate_limit_per_minute"], created["revoked_at"]) == ("acme app", 120, None)

    store = Store(db_url)
    try:
        assert store.admit(created["key"]).id == created["id"]

        listed = keys("list", "--json", "--db", db_url)
        assert listed.exit_code == 0, listed.output
        assert [k["id"] for k in json.loads(listed.stdout)] == [created["id"]]
        assert created["key"] not in listed.output and created["webhook_secret"] not in listed.output
        table = keys("list", "--db", db_url)
        assert created["id"] in table.output and created["key"] not in table.output

        revoked = keys("revoke", created["id"], "--db", db_url)
        assert revoked.exit_code == 0 and "Revoked" in revoked.output
        with pytest.raises(Unauthorized):
            store.admit(created["key"])
        assert keys("revoke", created["id"], "--db", db_url).exit_code == 0  # already revoked: nothing to do
        assert json.loads(keys("list", "--json", "--db", db_url).stdout)[0]["revoked_at"] is not None
    finally:
        store.close()


def test_data_dir_default_layout_and_human_output(tmp_path):
    made = keys("create", "--name", "laptop", "--data-dir", str(tmp_path))
    assert made.exit_code == 0, made.output
    assert "not shown again" in made.output and "dsk_" in made.output and "whsec_" in made.output
    assert (tmp_path / "orchestrator.sqlite").is_file()
    listed = json.loads(keys("list", "--json", "--data-dir", str(tmp_path)).stdout)
    assert [k["name"] for k in listed] == ["laptop"]


def test_the_orchestrators_own_data_dir_variable_wins_over_the_generic_one(tmp_path, monkeypatch):
    generic, own = tmp_path / "generic", tmp_path / "own"
    monkeypatch.setenv("DIPPY_DATA_DIR", str(generic))
    monkeypatch.setenv("DIPPY_ORCH_DATA_DIR", str(own))
    assert keys("create", "--name", "ops").exit_code == 0
    assert (own / "orchestrator.sqlite").is_file() and not generic.exists()
    monkeypatch.delenv("DIPPY_ORCH_DATA_DIR")
    assert json.loads(keys("list", "--json").stdout) == []  # the generic one, when it is the only one
    assert (generic / "orchestrator.sqlite").is_file()


@pytest.mark.parametrize("name", ["", "   ", "ops\x00team", "two\nlines"])
def test_a_key_name_no_database_can_keep_is_refused_and_no_key_made(db_url: str, name: str):
    # PostgreSQL refuses a NUL in text; a name over lines would break every listing.
    made = keys("create", "--name", name, "--db", db_url)
    assert made.exit_code == 2 and "one line of printable text" in made.output, made.output
    assert "Traceback" not in made.output
    assert json.loads(keys("list", "--json", "--db", db_url).stdout) == []


def test_unknown_key_id_fails_clearly(tmp_path):
    result = keys("revoke", "key_0123456789abcdef", "--data-dir", str(tmp_path))
    assert result.exit_code != 0
    assert "no API key with id 'key_0123456789abcdef'" in result.output


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "not a database URL"),
        ("mysql://db/x", "unsupported database"),
        ("postgresql://nobody:hunter2@127.0.0.1:1/nowhere", "cannot open database"),
    ],
)
def test_bad_database_urls_fail_clearly(url: str, message: str):
    result = keys("list", "--db", url)
    assert result.exit_code != 0
    assert message in result.output
    assert "hunter2" not in result.output  # never echo a password
    assert "Traceback" not in result.output


def test_serve_settings_come_from_flags_env_and_a_file(tmp_path, monkeypatch):
    import typer

    from dippy_studio.orchestrator import cli

    built = []

    def capture(settings):
        built.append(settings)
        raise typer.Exit(0)

    monkeypatch.setattr(cli, "_opened", lambda open_service, settings: capture(settings))
    monkeypatch.delenv("DIPPY_ORCH_PUBLIC_URL", raising=False)
    config = tmp_path / "orchestrator.toml"
    config.write_text('port = 9100\nprofile = "flux-dev"\nmax_attempts = 5\ndev_key = "//Alice"\n')
    monkeypatch.setenv("DIPPY_ORCH_PROFILE", "tiny")

    serve = ["serve", "--config", str(config), "--data-dir", str(tmp_path)]
    assert runner.invoke(orchestrator_app, [*serve, "--port", "9200"]).exit_code == 0
    settings = built.pop()
    assert (settings.port, settings.profile, settings.max_attempts) == (9200, "tiny", 5)  # flag > env > file
    assert settings.public_url == "http://127.0.0.1:9200"  # none given: this server's own address

    config.write_text('dev_key = "//Alice"\npublic_url = "https://orch.example"\n')
    assert runner.invoke(orchestrator_app, serve).exit_code == 0
    assert built.pop().public_url == "https://orch.example"

    missing = runner.invoke(orchestrator_app, ["serve", "--config", str(tmp_path / "missing.toml")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_a_database_error_is_told_in_one_line_even_when_the_driver_says_nothing():
    from sqlalchemy.exc import OperationalError

    wrapped = OperationalError("SELECT 1", {}, ConnectionError("connection refused\n\tis the server running?"))
    assert error_reason(wrapped) == "connection refused"
    assert error_reason(OperationalError("SELECT 1", {}, ConnectionError(" \n "))) == "OperationalError"


IN_MEMORY = ["sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite:///file::memory:?uri=true"]


@pytest.mark.parametrize("url", IN_MEMORY)
def test_an_in_memory_database_is_refused_before_a_key_is_made_and_lost(url: str):
    result = keys("create", "--name", "acme", "--db", url)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.exception
    assert "in-memory" in result.output and "dsk_" not in result.output


@pytest.mark.parametrize("url", IN_MEMORY)
def test_serve_refuses_an_in_memory_database(tmp_path, monkeypatch, url: str):
    monkeypatch.setenv("DIPPY_ORCH_DB_URL", url)
    result = runner.invoke(orchestrator_app, ["serve", "--dev-key", "//Alice", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.exception
    assert "db_url" in result.output and "in-memory" in result.output
