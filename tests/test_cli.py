"""The command line as a user meets it: outputs, determinism across processes, and clear errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from dippy_studio.cli import app
from dippy_studio.engine.synthetic import write_random_lora
from helpers import run_cli

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_generate_is_byte_identical_across_processes(tmp_path):
    """Two fresh interpreters, same request: same sha256, same file bytes, same fingerprint."""
    outputs = []
    for name in ("a.png", "b.png"):
        proc = run_cli(
            "generate", "a red cat", "--seed", "7", "--steps", "4", "--width", "64", "--height", "64",
            "-o", str(tmp_path / name), "--json",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        outputs.append(json.loads(proc.stdout))
    first, second = outputs
    assert first["sha256"] == second["sha256"]
    assert first["fingerprint"] == second["fingerprint"]
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert hashlib.sha256((tmp_path / "a.png").read_bytes()).hexdigest() == first["sha256"]
    assert set(first["timings"]) >= {"load", "text_encode", "denoise", "decode", "encode"}


def test_generate_prints_sha_and_fingerprint(tmp_path, tiny_engine):
    out = tmp_path / "x.png"
    result = invoke("generate", "a red cat", "--seed", "0", "-o", str(out))
    assert result.exit_code == 0, result.output
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    assert sha in result.output
    assert tiny_engine.fingerprint in result.output


def test_generate_with_loras(tmp_path, tiny_engine):
    lora = write_random_lora(tiny_engine.pipe, tmp_path / "style.safetensors", seed=4)
    shas = []
    for spec in (None, str(lora), f"{lora}:0.5"):
        args = ["generate", "a red cat", "-o", str(tmp_path / "x.png"), "--json"]
        result = invoke(*args, *(["--lora", spec] if spec else []))
        assert result.exit_code == 0, result.output
        shas.append(json.loads(result.output)["sha256"])
    assert len(set(shas)) == 3


def test_profile_prints_fingerprint_parts(tiny_engine):
    result = invoke("profile", "--json")
    assert result.exit_code == 0, result.output
    parts = json.loads(result.output)
    assert parts["fingerprint"] == tiny_engine.fingerprint
    for key in ("weights_sha256", "dtype", "device", "torch", "diffusers", "threads", "lora_mode",
                "cpu_capability"):  # fmt: skip
        assert key in parts
    table = invoke("profile")
    assert tiny_engine.fingerprint in table.output and "weights_sha256" in table.output


def test_profile_save_then_generate_from_model_path(tmp_path):
    saved = tmp_path / "tiny"
    assert invoke("profile", "--save", str(saved)).exit_code == 0
    assert (saved / "model_index.json").is_file()
    direct = json.loads(invoke("generate", "a cat", "-o", str(tmp_path / "a.png"), "--json").output)
    loaded = invoke("generate", "a cat", "--model-path", str(saved), "-o", str(tmp_path / "b.png"), "--json")
    assert loaded.exit_code == 0, loaded.output
    assert json.loads(loaded.output)["sha256"] == direct["sha256"]
    again = invoke("profile", "--save", str(saved))
    assert again.exit_code != 0 and "not empty" in again.output


def _nan_lora(path: Path) -> Path:
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.full((4, 32), float("nan"))}, path)
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "63"], "not a multiple of 16"),
        (["--height", "512"], "outside 16..256"),
        (["--steps", "0"], "greater than or equal to 1"),
        (["--steps", "500"], "less than or equal to 100"),
        (["--lora", "/nonexistent/lora.safetensors"], "does not exist"),
        (["--profile", "flux-dev"], "--model-path"),
        (["--profile", "nope"], "unknown profile"),
        (["--model-path", "/nonexistent"], "dippy_profile.json"),
        (["--threads", "0"], "threads"),
    ],
)
def test_bad_input_exits_nonzero_with_a_message(tmp_path, args, message):
    result = invoke("generate", "a cat", "-o", str(tmp_path / "x.png"), *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("prompt", ["", "   ", "x" * 2001])
def test_bad_prompts(tmp_path, prompt):
    result = invoke("generate", prompt, "-o", str(tmp_path / "x.png"))
    assert result.exit_code == 2 and "prompt" in result.output


def test_bad_lora_files(tmp_path):
    pickled = tmp_path / "lora.pt"
    torch.save({"a": torch.zeros(1)}, pickled)
    for path, message in [(pickled, "pickle"), (_nan_lora(tmp_path / "nan.safetensors"), "NaN or Inf")]:
        result = invoke("generate", "a cat", "--lora", str(path), "-o", str(tmp_path / "x.png"))
        assert result.exit_code == 2 and message in result.output


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = invoke("generate", "a cat", "-o", str(blocker / "x.png"))
    assert result.exit_code == 2 and "cannot write" in result.output


@pytest.mark.parametrize("command", [[], ["generate"], ["profile"], ["demo"]])
def test_help_everywhere(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


# Image tasks (edit, img2img, inpaint): --task, --image, --mask, --strength.

_IMAGE_TASKS_SCRIPT = """
import hashlib, io, json, sys
import numpy as np
from PIL import Image
from dippy_studio.engine import Engine, EngineOptions, GenerationRequest

def png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()

image = png(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8))
mask = np.zeros((40, 48), dtype=np.uint8)
mask[:20] = 255
base = dict(prompt="make it red", seed=3, width=32, height=32, steps=2, image=image)
runs = {
    "tiny-kontext edit": ("tiny-kontext", dict(task="edit")),
    "tiny img2img": ("tiny", dict(task="img2img", strength=0.6)),
    "tiny inpaint": ("tiny", dict(task="inpaint", mask=png(mask), strength=0.6)),
}
shas = {}
for name, (profile, fields) in runs.items():
    engine = Engine(EngineOptions(profile=profile))
    result = engine.generate(GenerationRequest(**base, **fields))
    shas[name] = [result.sha256, result.fingerprint]
print(json.dumps(shas))
"""


def test_image_tasks_are_byte_identical_across_processes():
    import subprocess
    import sys

    outputs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _IMAGE_TASKS_SCRIPT], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outputs.append(json.loads(proc.stdout))
    assert outputs[0] == outputs[1]
    assert len({sha for sha, _ in outputs[0].values()}) == 3


def _write_png(path: Path, size: tuple[int, int], mode: str = "RGB") -> Path:
    from PIL import Image

    Image.new(mode, size, 255 if mode == "L" else (200, 30, 30)).save(path)
    return path


def test_edit_takes_its_size_from_the_input_image(tmp_path):
    image = _write_png(tmp_path / "in.png", (70, 100))
    result = invoke(
        "generate", "make it blue", "--task", "edit", "--image", str(image), "--profile", "tiny-kontext",
        "--steps", "2", "-o", str(tmp_path / "x.png"), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert (payload["width"], payload["height"], payload["task"]) == (64, 96, "edit")
    sized = invoke(
        "generate", "make it blue", "--task", "img2img", "--image", str(image), "--width", "32",
        "--strength", "0.5", "--steps", "2", "-o", str(tmp_path / "y.png"), "--json",
    )  # fmt: skip
    assert sized.exit_code == 0, sized.output
    assert (json.loads(sized.output)["width"], json.loads(sized.output)["height"]) == (32, 96)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "edit"], "needs input image"),
        (["--task", "edit", "--image", "{bad}"], "not a PNG, JPEG or WebP"),
        (["--task", "edit", "--image", "/nonexistent.png"], "cannot read it"),
        (["--task", "inpaint", "--image", "{image}"], "needs mask"),
        (["--task", "inpaint", "--image", "{image}", "--mask", "{small_mask}"], "must be the image's size"),
        (["--task", "img2img", "--image", "{image}", "--strength", "0"], "strength"),
        (["--task", "img2img", "--image", "{image}", "--strength", "1.5"], "strength"),
        (["--task", "edit", "--image", "{image}", "--strength", "0.5"], "takes no strength"),
        (["--task", "img2img", "--image", "{image}", "--profile", "tiny-kontext"], "does not serve task img2img"),
        (["--task", "sketch"], "task"),
    ],
)
def test_bad_image_task_input_exits_nonzero_with_a_message(tmp_path, args, message):
    files = {
        "bad": tmp_path / "bad.png",
        "image": _write_png(tmp_path / "in.png", (48, 32)),
        "small_mask": _write_png(tmp_path / "mask.png", (16, 16), "L"),
    }
    files["bad"].write_bytes(b"not an image")
    args = [arg.format(**files) for arg in args]
    result = invoke("generate", "a cat", "--steps", "2", "-o", str(tmp_path / "x.png"), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


def test_profile_save_tiny_kontext_loads_as_stock_kontext(tmp_path):
    from diffusers import FluxKontextPipeline

    saved = tmp_path / "tiny-kontext"
    result = invoke("profile", "--profile", "tiny-kontext", "--save", str(saved), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads((saved / "model_index.json").read_text())["_class_name"] == "FluxKontextPipeline"
    assert isinstance(FluxKontextPipeline.from_pretrained(saved, local_files_only=True), FluxKontextPipeline)
    image = _write_png(tmp_path / "in.png", (48, 32))
    args = ["generate", "make it blue", "--task", "edit", "--image", str(image), "--steps", "2", "--json"]
    direct = invoke(*args, "--profile", "tiny-kontext", "-o", str(tmp_path / "a.png"))
    loaded = invoke(*args, "--model-path", str(saved), "-o", str(tmp_path / "b.png"))
    assert direct.exit_code == 0 and loaded.exit_code == 0, loaded.output
    assert json.loads(direct.output)["sha256"] == json.loads(loaded.output)["sha256"]
    assert json.loads(direct.output)["fingerprint"] == json.loads(loaded.output)["fingerprint"]


@pytest.mark.parametrize("service", [["miner", "serve"], ["orchestrator", "serve"], ["validator", "run", "--once"]])
@pytest.mark.parametrize("content", [b"port = [[[\n", b"\xff\xfe alpha = "], ids=["not-toml", "not-utf8"])
def test_a_config_file_that_is_not_toml_is_named_by_every_service(tmp_path, service, content):
    config = tmp_path / "settings.toml"
    config.write_bytes(content)
    result = invoke(*service, "--dev-key", "//Alice", "--data-dir", str(tmp_path), "--config", str(config))
    assert result.exit_code == 2, result.output
    assert f"config file {config} is not valid TOML" in " ".join(result.output.split()), result.output


@pytest.mark.parametrize(
    ("service", "variable"),
    [
        (["miner", "serve"], "DIPPY_MINER_CALLBACK_TIMEOUT"),
        (["orchestrator", "serve"], "DIPPY_ORCH_DOWNLOAD_TIMEOUT_S"),
        (["validator", "run", "--once"], "DIPPY_VALIDATOR_MAX_SCORES_AGE_S"),
    ],
)
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_an_infinite_or_nan_setting_is_refused_by_every_service(tmp_path, service, variable, value):
    result = runner.invoke(app, [*service, "--dev-key", "//Alice", "--data-dir", str(tmp_path)], env={variable: value})
    assert result.exit_code == 2, result.output
    assert "finite number" in result.output, result.output
