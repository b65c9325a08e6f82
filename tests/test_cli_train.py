"""`dippy-studio train` and `eval-lora` as a user meets them: outputs, determinism, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dippy_studio.cli import app
from dippy_studio.engine.synthetic_data import write_dataset, zip_bytes
from dippy_studio.engine.training import TrainConfig, read_metadata, train_lora
from zip_bombs import MiB, amplifying_zip, peak_rss_growth

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-data")
    return {
        "train": write_dataset(root / "train.zip", "sunset", count=6, seed=0, size=32),
        "heldout": write_dataset(root / "heldout", "sunset", count=4, seed=1, size=32),
    }


def test_train_eval_and_generate_with_the_result(shapes, tmp_path):
    lora = tmp_path / "lora.safetensors"
    trained = invoke("train", shapes["train"], "--trigger", "sks", "--steps", "40", "-o", lora, "--json")
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.stdout)
    assert summary["steps"] == 40 and summary["output"] == str(lora) and not summary["stopped_early"]
    assert read_metadata(lora)["dippy.trigger"] == "sks"

    evaluated = invoke("eval-lora", lora, shapes["heldout"], "--json")
    assert evaluated.exit_code == 0, evaluated.output
    scores = json.loads(evaluated.stdout)
    assert scores["lora_loss"] < scores["base_loss"] and scores["improvement"] > 0
    assert scores["trigger"] == "sks"

    table = invoke("eval-lora", lora, shapes["heldout"], "--seed", "3")
    assert table.exit_code == 0, table.output
    assert "base loss" in table.stdout and "improvement" in table.stdout

    shas = []
    for extra in ([], ["--lora", str(lora)]):
        result = invoke("generate", "sks a red circle", "-o", tmp_path / "x.png", "--json", *extra)
        assert result.exit_code == 0, result.output
        shas.append(json.loads(result.stdout)["sha256"])
    assert shas[0] != shas[1]


def test_train_prints_a_summary_and_progress(shapes, tmp_path):
    result = invoke("train", shapes["train"], "--steps", "5", "--rank", "2", "-o", tmp_path / "l.safetensors")
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'l.safetensors'}" in result.stdout
    assert "steps       5/5" in result.stdout
    assert "loss" in result.stderr  # the progress bar
    assert read_metadata(tmp_path / "l.safetensors")["dippy.rank"] == "2"


def test_training_is_byte_identical_across_processes(shapes, tmp_path):
    """Two fresh interpreters (run side by side), same dataset, config, seed and profile."""
    outputs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    env = {**os.environ, "DIPPY_ENGINE__THREADS": "2"}

    def command(out: Path) -> list[str]:
        args = ["train", str(shapes["train"]), "--trigger", "sks", "--steps", "30", "--seed", "11"]
        return [sys.executable, "-m", "dippy_studio.cli", *args, "-o", str(out), "--json"]

    procs = [
        subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for out in outputs
    ]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        assert json.loads(stdout)["steps"] == 30
    first, second = (out.read_bytes() for out in outputs)
    assert first == second
    in_process = train_lora(shapes["train"], tmp_path / "c.safetensors", TrainConfig(trigger="sks", steps=30, seed=11))
    assert in_process.path.read_bytes() == first


def test_resume_from_the_command_line(shapes, tmp_path):
    whole = invoke("train", shapes["train"], "--steps", "8", "-o", tmp_path / "whole.safetensors", "--json")
    part = invoke(
        "train", shapes["train"], "--steps", "5", "--checkpoint-every", "5", "-o", tmp_path / "part.safetensors"
    )
    assert whole.exit_code == 0 and part.exit_code == 0, part.output
    checkpoint = tmp_path / "part.ckpt.safetensors"
    assert "checkpoint" in part.stdout and checkpoint.exists()
    resumed = invoke(
        "train", shapes["train"], "--steps", "8", "--resume", checkpoint, "-o", tmp_path / "resumed.safetensors"
    )
    assert resumed.exit_code == 0, resumed.output
    assert (tmp_path / "resumed.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


def test_max_seconds_stops_early(shapes, tmp_path):
    out = tmp_path / "budget.safetensors"
    result = invoke("train", shapes["train"], "--steps", "1000000", "--max-seconds", "2", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["stopped_early"] and summary["steps"] < 1_000_000  # a busy machine may do none
    assert read_metadata(out)["dippy.steps"] == str(summary["steps"])


def test_errors_are_clear_and_exit_non_zero(shapes, tmp_path):
    traversal = tmp_path / "evil.zip"
    traversal.write_bytes(zip_bytes([("../escape.png", b"x")]))
    out = tmp_path / "l.safetensors"
    cases = [
        (["train", tmp_path / "missing", "-o", out], "does not exist"),
        (["train", traversal, "-o", out], "points outside the archive"),
        (["train", shapes["train"], "--lr", "-1", "-o", out], "lr: Input should be greater than 0"),
        (["train", shapes["train"], "--resolution", "40", "-o", out], "not a multiple of 16"),
        (["train", shapes["train"], "--steps", "20", "--lr", "1e20", "-o", out], "training diverged"),
        (["train", shapes["train"], "--target", "nope", "-o", out], "do not fit the transformer"),
        (["train", shapes["train"], "--profile", "nope", "-o", out], "unknown profile 'nope'"),
        (["train", shapes["train"], "--resume", tmp_path / "none.ckpt", "-o", out], "does not exist"),
        (["eval-lora", tmp_path / "missing.safetensors", shapes["heldout"]], "does not exist"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code != 0, (args, result.output)
        assert message in " ".join(result.stderr.split()), (args, result.stderr)
    assert not out.exists()


def test_train_refuses_an_amplifying_dataset_before_unpacking_it(tmp_path):
    """About 3 MB of zip whose captions unpack to 192 MiB: a clear error, and no memory spent on them."""
    bomb = tmp_path / "bomb.zip"
    bomb.write_bytes(amplifying_zip(pairs=8, caption_bytes=24 * MiB))
    result, growth = peak_rss_growth(lambda: invoke("train", bomb, "-o", tmp_path / "l.safetensors"))
    assert result.exit_code != 0
    assert "caption 'img00.txt' is 25165824 bytes, over the 4096-byte limit for a caption" in " ".join(
        result.stderr.split()
    )
    assert growth < 50 * MiB, f"grew by {growth / MiB:.0f} MiB"
    assert not (tmp_path / "l.safetensors").exists()


def test_eval_lora_rejects_a_bad_heldout_dataset(shapes, tmp_path):
    lora = tmp_path / "l.safetensors"
    assert invoke("train", shapes["train"], "--steps", "2", "-o", lora).exit_code == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("eval-lora", lora, empty)
    assert result.exit_code != 0
    assert "no images found" in result.stderr
