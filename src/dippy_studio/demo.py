"""The `up --demo` workload: real client traffic through the public API of a local subnet,
then a per-miner summary (jobs, latency, audits, score, on-chain weight)."""

from __future__ import annotations

import base64
import io
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dippy_studio.chain.local import LocalChain
from dippy_studio.protocol.limits import profile_limits
from dippy_studio.subnet_layout import SubnetLayout

TERMINAL = {"succeeded", "failed", "canceled"}
# In the toy profile's vocabulary (colour, shape, background colour), so its pictures show them.
PROMPTS = (
    "a red circle on a blue background",
    "a yellow triangle on a black background",
    "a white square on a purple background",
    "a green circle on a white background",
)


@dataclass
class DemoResult:
    requests: list[dict[str, Any]]
    lora_id: str | None


class DemoClient:
    def __init__(self, base_url: str, api_key: str, steps: int = 4) -> None:
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
        self.steps = steps

    def image(self, prompt: str, seed: int, loras: list[dict[str, Any]] | None = None, **task: Any) -> str:
        """Submit an image request; `task` adds the image-task fields (task, image, mask, strength)."""
        body = {"prompt": prompt, "seed": seed, "width": 64, "height": 64, "steps": self.steps, "loras": loras or []}
        body.update(task)
        response = self.http.post("/v1/images", json=body)
        response.raise_for_status()
        return response.json()["request_id"]

    def result(self, view: dict[str, Any]) -> bytes:
        response = self.http.get(view["result"]["url"])
        response.raise_for_status()
        return response.content

    def train(self, dataset: bytes, trigger: str) -> str:
        response = self.http.post(
            "/v1/loras",
            files={"dataset": ("dataset.zip", dataset, "application/zip")},
            data={"trigger_word": trigger, "name": f"{trigger} style", "rank": "4", "steps": "60"},
        )
        response.raise_for_status()
        return response.json()["request_id"]

    def status(self, request_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/requests/{request_id}")
        response.raise_for_status()
        return response.json()

    def wait(self, ids: list[str], progress: Progress, label: str, timeout: float = 600) -> list[dict[str, Any]]:
        task = progress.add_task(label, total=len(ids))
        done: dict[str, dict[str, Any]] = {}
        end = time.monotonic() + timeout
        while len(done) < len(ids) and time.monotonic() < end:
            for request_id in ids:
                if request_id not in done:
                    view = self.status(request_id)
                    if view["status"] in TERMINAL:
                        done[request_id] = view
                        progress.advance(task)
            time.sleep(0.3)
        return [done.get(i) or self.status(i) for i in ids]


def run_demo(layout: SubnetLayout, api_key: str, console: Console, profile: str = "tiny") -> DemoResult:
    limits = profile_limits(profile)
    client = DemoClient(layout.orchestrator_url, api_key, steps=limits.default_steps)
    views: list[dict[str, Any]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        prompts = list(PROMPTS)
        first = [client.image(prompts[i % len(prompts)], seed=i) for i in range(12)]
        views += client.wait(first, progress, "1/4 inference without LoRAs")
        views += client.wait(_edits(client, views, limits.tasks), progress, "2/4 edits, img2img and inpainting")
        dataset, trigger = style_dataset(profile)
        train_id = client.train(dataset, trigger)
        trained = client.wait([train_id], progress, "3/4 LoRA training", timeout=900)[0]
        views.append(trained)
        lora_id = (trained.get("result") or {}).get("lora_id")
        if lora_id:
            lora = [{"id": lora_id, "scale": 1.0}]
            third = [client.image(f"{trigger} {p}", seed=100 + i, loras=lora) for i, p in enumerate(prompts * 2)]
            views += client.wait(third, progress, "4/4 inference with the trained LoRA")
        else:
            console.print(f"[red]training did not produce a LoRA:[/] {trained.get('error')}")
    return DemoResult(views, lora_id)


def style_dataset(profile: str) -> tuple[bytes, str]:
    """A zipped training set of a style the profile's model does not draw, and its trigger word:
    for toy, objects drawn yellow whatever colour their caption names (a change a person sees
    and `engine.toy.check` measures); for the random-weight profiles, sunset-coloured shapes."""
    if profile != "toy":
        from dippy_studio.engine.synthetic_data import write_dataset

        with tempfile.TemporaryDirectory() as tmp:
            return write_dataset(Path(tmp) / "sunset.zip", style="sunset", count=6, seed=1).read_bytes(), "sunsetstyle"
    from dippy_studio.engine.datasets import zip_bytes
    from dippy_studio.engine.images import encode_png
    from dippy_studio.engine.toy.data import gold_style

    files = []
    for index, (caption, picture) in enumerate(gold_style()):
        files += [(f"gold_{index}.png", encode_png(picture)), (f"gold_{index}.txt", caption.encode())]
    return zip_bytes(files), "goldstyle"


def _edits(client: DemoClient, done: list[dict[str, Any]], tasks: tuple[str, ...]) -> list[str]:
    """Image tasks on the first images drawn: an instruction edit (where the profile serves edits),
    img2img and inpainting of each (the cheater's variant cheats on these too: it ignores the input
    or returns it unchanged)."""
    sources = [view for view in done if view["status"] == "succeeded"][:3]
    ids = []
    for i, view in enumerate(sources):
        image = _data_uri(client.result(view))
        if "edit" in tasks:
            ids.append(client.image("make it night, with stars", seed=200 + i, task="edit", image=image))
        # At 4 steps a strength of 0.6 keeps the input's structure (at 0.8 no step would start from it).
        ids.append(client.image(PROMPTS[-1], seed=300 + i, task="img2img", image=image, strength=0.6))
        ids.append(
            client.image(
                "a cyan square on a black background",
                seed=400 + i,
                task="inpaint",
                image=image,
                mask=_centre_mask(64),
                strength=0.9,
            )
        )
    return ids


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _centre_mask(side: int) -> str:
    """A mask that repaints the middle quarter of a square image (white: repaint)."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).rectangle((side // 4, side // 4, 3 * side // 4 - 1, 3 * side // 4 - 1), fill=255)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return _data_uri(buffer.getvalue())


def summary_table(layout: SubnetLayout, result: DemoResult, scores: dict[str, float], audits: dict[str, list[str]]):
    chain = LocalChain(layout.root / "chain.sqlite", create=False)
    graph = chain.metagraph()
    weights = chain.weights().get(graph.uid_of(layout.validator_hotkey) or -1, {})
    per_miner: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for view in result.requests:
        if view.get("miner_hotkey"):
            per_miner[view["miner_hotkey"]].append(view)
    table = Table(
        title="local subnet: per-miner summary",
        title_justify="left",
        caption="score: the orchestrator's, over its window; weight: the validator's last on-chain weights, "
        "smoothed over its rounds (EMA), so they lag the scores",
        caption_justify="left",
    )
    for column in ("miner", "uid", "cheater", "done", "failed", "p50 s", "p95 s", "audits ok", "audits failed",
                   "score", "weight"):  # fmt: skip
        table.add_column(column, justify="left" if column == "miner" else "right")
    for miner in layout.miners:
        views = per_miner.get(miner.hotkey, [])
        latencies = [v["timings"].get("total_s") for v in views if v["status"] == "succeeded"]
        latencies = sorted(x for x in latencies if x is not None)
        uid = graph.uid_of(miner.hotkey)
        verdicts = audits.get(miner.hotkey, [])
        table.add_row(
            miner.name, str(uid), "yes" if miner.cheater else "",
            str(sum(v["status"] == "succeeded" for v in views)), str(sum(v["status"] == "failed" for v in views)),
            f"{statistics.median(latencies):.2f}" if latencies else "-",
            f"{_p95(latencies):.2f}" if latencies else "-",
            str(verdicts.count("pass")), str(verdicts.count("fail")),
            f"{scores.get(miner.hotkey, 0.0):.3f}", f"{weights.get(uid, 0.0):.3f}" if uid is not None else "-",
        )  # fmt: skip
    return table, {m.name: weights.get(graph.uid_of(m.hotkey), 0.0) for m in layout.miners}


def _p95(values: list[float]) -> float:
    return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
