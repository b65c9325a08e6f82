"""Submissions are written together (one transaction for whatever arrives at once), so a bad one must
never take its neighbours down: concurrent good and bad requests, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

import orchestrator.orch_kit as kit
from orchestrator.orch_kit import image_body

subnet = kit.subnet  # fixture: a local chain, miners and orchestrators

GOOD = 100
# Values that pass the request schema, or fail only once the request is being built into a job.
BAD_BODIES = [
    image_body(deadline_s=1e-9),  # shorter than any job can take
    image_body(deadline_s=0.5),
    image_body(deadline_s=1e308),  # over the maximum
    image_body(deadline_s=-1),
    image_body(steps=99),  # over the tiny profile's 50
    image_body(width=512),  # over the tiny profile's 256
    image_body(loras=[{"id": "lora_nobody"}]),  # not this key's LoRA
    image_body(seed=2**64),
    image_body(prompt="   "),
    {**image_body(), "unexpected": 1},
]


@pytest.mark.timeout(240)
def test_bad_submissions_get_a_4xx_and_never_break_good_ones_sent_with_them(subnet, db_url):
    orch = subnet.start_orchestrator(db_url=db_url)
    good_key, bad_key = subnet.new_key(orch, name="good"), subnet.new_key(orch, name="bad")
    bad_bodies = BAD_BODIES * 6
    sends = [(good_key, image_body(seed=n)) for n in range(GOOD)] + [(bad_key, body) for body in bad_bodies]
    random.Random(7).shuffle(sends)

    async def send_all() -> list[tuple[str, httpx.Response]]:
        async with httpx.AsyncClient(base_url=orch.url, timeout=60) as client:

            async def send(key: kit.Key, body: dict) -> tuple[str, httpx.Response]:
                headers = {"Authorization": f"Bearer {key.secret}"}
                return key.id, await client.post("/v1/images", json=body, headers=headers)

            return await asyncio.gather(*(send(key, body) for key, body in sends))

    answers = asyncio.run(send_all())
    good = [response for key_id, response in answers if key_id == good_key.id]
    bad = [response for key_id, response in answers if key_id == bad_key.id]
    assert [r.status_code for r in good] == [202] * GOOD, [r.text for r in good if r.status_code != 202][:3]
    assert all(400 <= r.status_code < 500 for r in bad), [(r.status_code, r.text) for r in bad if r.status_code >= 500]
    assert all(r.json()["detail"] for r in bad)
    # Every good request is stored, and none of the bad ones.
    stored = orch.store.list_jobs(good_key.id, limit=GOOD + 1)
    assert len(stored) == GOOD
    assert orch.store.list_jobs(bad_key.id) == []
