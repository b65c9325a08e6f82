"""The toy profile end to end through the public API: a LoRA trained on a new style through
`POST /v1/loras` visibly changes what `POST /v1/images` draws, as `engine.toy.check` measures.

Real toy miner and orchestrator over HTTP; the engine-only version of the same claim is
`tests/engine/test_toy.py::test_a_lora_trained_on_a_new_style_moves_the_measured_colour`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

import orchestrator.orch_kit as kit
from dippy_studio.demo import style_dataset
from dippy_studio.engine import Engine, EngineOptions
from dippy_studio.engine.toy import check, data
from orchestrator.orch_kit import wait_status

# One thread: on a busy 2-core machine two are much slower, and the toy's bytes are the same.
OPTIONS = EngineOptions(profile="toy", threads=1)
COLOURS = ("red", "green", "blue", "purple")  # what the gold style's captions name, never yellow


@pytest.fixture(scope="module")
def toy() -> Engine:
    return Engine(OPTIONS)


@pytest.fixture
def subnet(tmp_path: Path, toy: Engine) -> Iterator[kit.Subnet]:
    net = kit.Subnet(tmp_path, toy)
    yield net
    net.close()


def draw_all(client: httpx.Client, prompts: list[str], loras: list[dict[str, Any]]) -> list[Image.Image]:
    """Each prompt through `POST /v1/images` (seed = its index), the PNGs downloaded."""
    ids = [
        client.post("/v1/images", json={"prompt": p, "seed": i, "width": 64, "height": 64, "loras": loras}).json()[
            "request_id"
        ]
        for i, p in enumerate(prompts)
    ]
    images = []
    for request_id in ids:
        assert wait_status(client, request_id, {"succeeded", "failed"}, 60)["status"] == "succeeded"
        png = client.get(f"/v1/requests/{request_id}/result")
        assert png.headers["content-type"] == "image/png"
        images.append(Image.open(io.BytesIO(png.content)))
    return images


def test_a_lora_trained_through_the_api_turns_the_toy_models_objects_yellow(subnet):
    subnet.add_miner("//Bob", settings={"engine": OPTIONS})
    orch = subnet.start_orchestrator(profile="toy")
    client = subnet.client(orch, subnet.new_key(orch))

    dataset, trigger = style_dataset("toy")
    submitted = client.post(
        "/v1/loras", data={"trigger_word": trigger, "seed": "1"}, files={"dataset": ("gold.zip", dataset)}
    )
    assert submitted.status_code == 202, submitted.text
    trained = wait_status(client, submitted.json()["request_id"], {"succeeded", "failed"}, 120)
    assert trained["status"] == "succeeded", trained

    scenes = [data.Scene(COLOURS[i % 4], data.SHAPES[i % 3], ("black", "cyan")[i % 2]) for i in range(6)]
    # The same prompts (trigger included, as a user of the LoRA writes them) with and without it.
    prompts = [f"{trigger} {scene.caption}" for scene in scenes]
    before = [check.observe(image) for image in draw_all(client, prompts, [])]
    after = [check.observe(image) for image in draw_all(client, prompts, [{"id": trained["result"]["lora_id"]}])]

    # Without the LoRA every object has its prompt's colour, so none is yellow.
    assert [o.colour for o in before] == [s.colour for s in scenes], before
    assert sum(o.colour == "yellow" for o in after) >= 0.75 * len(scenes), after
    assert sum(o.shape == s.shape for o, s in zip(after, scenes, strict=True)) >= 0.75 * len(scenes), after
