"""Training datasets at the orchestrator's door: an archive that unpacks to far more than it
weighs is refused with a 422 that names the problem, without the orchestrator's memory growing
by what it would unpack to, whether uploaded or fetched; `max_dataset_bytes` bounds what a
dataset unpacks to as well as its archive."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

import miner_kit
from dippy_studio.engine.synthetic_data import zip_bytes
from dippy_studio.orchestrator.app import create_app
from dippy_studio.orchestrator.settings import OrchestratorSettings
from orchestrator.orch_kit import ORCHESTRATOR
from zip_bombs import MiB, amplifying_text, amplifying_zip, lying_zip, peak_rss_growth

server = miner_kit.server  # fixture: serves files on 127.0.0.1


@pytest.fixture
def make_client(tmp_path) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        settings = OrchestratorSettings(
            data_dir=tmp_path / f"orch{len(clients)}", allow_loopback_urls=True, **overrides
        )
        client = TestClient(create_app(settings, signer=ORCHESTRATOR))
        client.__enter__()
        secret = client.app.state.orchestrator.store.create_api_key("client").secret
        client.headers["Authorization"] = f"Bearer {secret}"
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def upload(client: TestClient, archive: bytes):
    return client.post("/v1/loras", data={"trigger_word": "sks"}, files={"dataset": ("d.zip", archive)})


def test_amplifying_datasets_get_422_without_being_unpacked(make_client, server):
    client = make_client()
    bomb = amplifying_zip(pairs=8, caption_bytes=24 * MiB)  # about 3 MB unpacking to 192 MiB
    lying = lying_zip("a.txt", b"a red square", amplifying_text(24 * MiB))
    server.files["/bomb.zip"] = bomb
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: upload(client, bomb), "caption 'img00.txt' is 25165824 bytes, over the 4096-byte limit"),
        (lambda: upload(client, lying), "'a.txt' holds more than the 12 bytes its directory declares"),
        (
            lambda: client.post("/v1/loras", data={"trigger_word": "sks", "dataset_url": server.url("/bomb.zip")}),
            "caption 'img00.txt' is 25165824 bytes",
        ),
    ]
    for submit, message in cases:
        response, growth = peak_rss_growth(submit)
        assert response.status_code == 422, response.text
        assert message in response.json()["detail"]
        assert growth < 50 * MiB, f"{message}: the orchestrator grew by {growth / MiB:.0f} MiB"


def uncompressed_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (10, 120, 200)).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def test_max_dataset_bytes_bounds_what_a_dataset_unpacks_to(make_client):
    image = uncompressed_png(100)
    archive = zip_bytes([(f"{i}.png", image) for i in range(4)])
    total = 4 * len(image)
    assert len(archive) < total // 10  # the archive alone is far under either limit below
    refused = upload(make_client(max_dataset_bytes=total - 1), archive)
    assert refused.status_code == 422
    assert f"come to more than {total - 1} bytes uncompressed" in refused.json()["detail"]
    accepted = upload(make_client(max_dataset_bytes=total), archive)
    assert accepted.status_code == 202, accepted.text
