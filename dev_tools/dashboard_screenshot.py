"""Take the README's dashboard screenshot: run `dippy-studio up --demo` (the toy model by default),
wait for the demo to finish, and photograph the dashboard in headless Chromium.

    .venv/bin/python dev_tools/dashboard_screenshot.py [--out docs/dashboard.png] [--profile toy]

Needs Debian's Chromium (`apt-get install chromium`) and the dev extra (Playwright).
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage"]
# `up` prints this once the demo's summary table is out.
DEMO_DONE = "per-miner summary"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(log: Path, pattern: str, timeout: float, up: subprocess.Popen) -> str:
    """The first match of `pattern` in `up`'s log; exits with the log's tail if `up` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found.group(0)
        if up.poll() is not None:
            break
        time.sleep(1)
    sys.exit(f"gave up waiting for {pattern!r}; the end of up's log:\n{log.read_text()[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--profile", default="toy")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds to wait for the demo")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        root, port, log_path = Path(tmp) / "subnet", free_port(), Path(tmp) / "up.log"
        with open(log_path, "w") as log:
            up = subprocess.Popen(
                [sys.executable, "-m", "dippy_studio.cli", "up", "--demo", "--data-dir", str(root),
                 "--port", str(port), "--profile", args.profile],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                url = wait_for(log_path, r"http://127\.0\.0\.1:\d+/dashboard\S*", 300, up)
                print(f"subnet up; waiting for the demo (log: {log_path})", flush=True)
                wait_for(log_path, DEMO_DONE, args.timeout, up)
                with sync_playwright() as pw:
                    browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                    page = browser.new_page(viewport={"width": 1400, "height": 1800})
                    page.goto(url)
                    page.locator("#gallery figure img").first.wait_for(timeout=60_000)
                    # Lazy images load once scrolled to; give the live plots a moment to draw.
                    page.locator("#gallery").scroll_into_view_if_needed()
                    page.wait_for_timeout(3000)
                    page.evaluate("window.scrollTo(0, 0)")
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(args.out), full_page=True)
                    browser.close()
                print(f"wrote {args.out}")
            finally:
                up.send_signal(signal.SIGINT)
                try:
                    up.wait(60)
                except subprocess.TimeoutExpired:
                    up.kill()


if __name__ == "__main__":
    main()
