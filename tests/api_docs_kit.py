"""The check that a service's API pages work offline: shared by the orchestrator's and the miner's tests."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient


def assert_docs_load_only_served_assets(client: TestClient) -> None:
    """/docs and /redoc are HTML that names no outside URL, and every asset they load answers 200."""
    for page in ("/docs", "/redoc"):
        html = client.get(page)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        assert "http://" not in html.text and "https://" not in html.text, html.text
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
        assert any(asset.endswith(".js") for asset in assets), html.text
        for asset in assets:
            fetched = client.get(asset)
            assert fetched.status_code == 200 and fetched.content, asset
