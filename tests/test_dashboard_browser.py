"""The dashboard in a real headless Chromium (Debian's, driven by Playwright), against a whole
local subnet started with `dippy-studio up`: the page shows the jobs we ran, the cheater's failed
audits with their evidence, the weights the validator set, and updates live without a reload."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dippy_studio.localnet import create_api_key
from dippy_studio.orchestrator.dashboard import GALLERY_SIZE
from localnet_kit import dashboard_urls, free_port, stop, wait_healthy, wait_until

CHROMIUM = os.environ.get("DIPPY_CHROMIUM", "/usr/bin/chromium")
# Where the screenshot lands (gitignored); CI can keep it as an artifact.
ARTIFACTS = Path(os.environ.get("DIPPY_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / ".artifacts"))
# Without these, Chromium tries to reach Google's services, which this network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]  # fmt: skip

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency: ./dev test installs it")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).is_file(),
        reason=f"no Chromium at {CHROMIUM}: `./dev test` installs Debian's (apt-get install chromium)",
    ),
]


def submit(client: httpx.Client, prompts: list[str], timeout: float = 180) -> list[str]:
    """Submit images through the public API and wait until all have succeeded."""
    ids = []
    for n, prompt in enumerate(prompts):
        body = {"prompt": prompt, "seed": 100 + n, "width": 64, "height": 64, "steps": 2}
        reply = client.post("/v1/images", json=body, headers={"Prefer": "wait=30"})
        assert reply.status_code in (200, 202), reply.text
        ids.append(reply.json()["request_id"])
    deadline = time.monotonic() + timeout
    for request_id in ids:
        while (status := client.get(f"/v1/requests/{request_id}").json()["status"]) != "succeeded":
            assert status in ("queued", "dispatched", "running") and time.monotonic() < deadline, status
            time.sleep(0.5)
    return ids


def test_dashboard_in_chromium_shows_a_live_subnet(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    root, port = tmp_path / "subnet", free_port()
    log_path = tmp_path / "up.log"
    log = open(log_path, "w")  # noqa: SIM115 (a pipe nobody reads would fill and block `up`)
    up = subprocess.Popen(
        [sys.executable, "-m", "dippy_studio.cli", "up", "--data-dir", str(root), "--port", str(port),
         "--miners", "2", "--cheater", "1", "--profile", "tiny"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_healthy(port)
        base = f"http://127.0.0.1:{port}"
        secret, _ = create_api_key(root, "browser-test")
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {secret}"}, timeout=90)
        first = submit(client, [f"a lighthouse, take {n}" for n in range(4)])
        # Routing is random: go on until both miners (the honest one and the cheater) served some.
        # A score at most doubles a miner's share, so all of 12 jobs to one miner was up to 0.8%
        # likely; of 30, under 1e-5.
        for extra in range(26):
            if len({client.get(f"/v1/requests/{i}").json()["miner_uid"] for i in first}) == 2:
                break
            first += submit(client, [f"a lighthouse, extra take {extra}"])
        else:
            raise AssertionError("one miner got every job")

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            # As a user does: the URL `up` printed, whose token becomes a cookie and leaves the address bar.
            [url] = wait_until(lambda: dashboard_urls(log_path), 120, "up to print the dashboard URL")
            page.goto(url)
            assert page.url == f"{base}/dashboard"
            expect(page.locator("#live")).to_have_text("live", timeout=30_000)
            expect(page.locator("#miners tbody tr")).to_have_count(2, timeout=60_000)
            for request_id in first[-GALLERY_SIZE:]:  # the gallery shows the latest jobs
                figure = page.locator(f'#gallery figure[data-job-id="{request_id}"]')
                expect(figure).to_be_visible(timeout=30_000)
                # The gallery's images load lazily: wait for this one to be decoded, whatever else redraws.
                figure.scroll_into_view_if_needed()
                page.wait_for_function(
                    "sel => document.querySelector(sel)?.complete && document.querySelector(sel).naturalWidth === 64",
                    arg=f'#gallery figure[data-job-id="{request_id}"] img',
                    timeout=30_000,
                )  # the gallery shows the image itself, at the tiny profile's 64 px
            # Every job is audited on a local subnet: the cheater's wrong seeds show up with evidence.
            failure = page.locator("#audit-failures article").first
            expect(failure).to_be_visible(timeout=90_000)
            expect(failure.locator(".reason")).to_contain_text("audit failed")
            expect(failure.locator("img")).to_have_count(2)
            cheater = failure.get_attribute("data-hotkey")
            expect(page.locator(f'#miners tr[data-hotkey="{cheater}"] .pill')).to_have_text("penalized")
            honest = page.locator("#miners tbody tr").filter(has_not=page.locator(".pill.penalized"))
            expect(honest.locator("[data-outcome=succeeded]")).to_contain_text("succeeded")
            expect(page.locator(".plot svg path.p50").first).to_be_attached()
            # The audits still owed, from the store: a count, never "undefined".
            expect(page.locator('[data-total="audits owed"] .value')).to_have_text(re.compile(r"^\d+$"))

            # Live: new jobs appear without a reload (the marker would not survive one).
            page.evaluate("window.__noReload = true")
            total = page.locator('[data-total="succeeded"] .value')
            before = int(total.inner_text())
            later = submit(client, ["a red fox in snow", "a paper boat"])
            expect(page.locator(f'#gallery figure[data-job-id="{later[-1]}"]')).to_be_visible(timeout=30_000)
            expect(total).not_to_have_text(str(before), timeout=30_000)
            assert int(total.inner_text()) >= before + len(later)
            # The validator turns scores into weights every tempo: the honest miner's share shows.
            expect(honest.locator(".weight")).not_to_have_text("0.0%", timeout=120_000)
            expect(honest.locator(".weight")).not_to_have_text("–")
            # ... and the next epoch pays the miner for it.
            expect(honest.locator(".emission")).not_to_have_text("0.0000", timeout=120_000)
            expect(page.locator(f'#miners tr[data-hotkey="{cheater}"] .weight')).to_have_text("0.0%")
            assert page.evaluate("window.__noReload") is True

            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            shutil.copy(shot, tmp_path / "dashboard.png")
            browser.close()
        assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000
        client.close()
    finally:
        stop(up, root)
        log.close()
