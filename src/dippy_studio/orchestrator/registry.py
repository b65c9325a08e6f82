"""The miner registry: who the miners are (from the chain) and what they can do now (from probes).

`sync` reads the metagraph: hotkeys, uids, stake, and each miner's commitment, which holds its
endpoint URL. `probe_all` asks every miner with an endpoint for `/health` and a signed
`/v1/capacity`, and records the answer; a miner is healthy only when it answers both, as the
hotkey it registered with, and serves at least one lane. Both write to the store, so every
orchestrator replica routes from the same picture.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from dippy_studio.chain.base import Chain, ChainError
from dippy_studio.orchestrator.models import Miner, utcnow
from dippy_studio.orchestrator.routing import Candidate
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.orchestrator.store import Store
from dippy_studio.protocol.auth import sign_request
from dippy_studio.protocol.keys import Signer
from dippy_studio.protocol.outbound import OutboundError, check_url, guarded_client
from dippy_studio.protocol.schemas import Capacity

log = logging.getLogger("dippy_studio.orchestrator.registry")

MAX_PROBE_THREADS = 16


def parse_endpoint(commitment: str | None) -> str | None:
    """The miner's base URL from its commitment, or None when it holds no usable http(s) URL."""
    if not commitment:
        return None
    url = commitment.strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a malformed port)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        return None
    return url.rstrip("/")


def endpoint_url(endpoint: str, path: str) -> tuple[str, str]:
    """The full URL of `path` on a miner, and the request target to sign (the endpoint may have a path)."""
    target = urlsplit(endpoint).path.rstrip("/") + path
    return endpoint.rstrip("/") + path, target


class Registry:
    def __init__(
        self,
        store: Store,
        chain: Chain | None,
        signer: Signer,
        settings: OrchestratorSettings,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.chain = chain
        self.signer = signer
        self.settings = settings
        self.clock = clock
        self.url_policy = settings.url_policy
        self._http = guarded_client(self.url_policy, timeout=settings.probe_timeout_s)
        self._lock = threading.Lock()
        self._candidates: list[Candidate] | None = None
        self._candidates_at = 0.0
        self._generation = 0  # bumped by every change this process makes to the miners table
        # Reference workers re-run audits only: were they dispatched client jobs, audited miners
        # would see audit traffic (and audits would judge a worker by itself).
        self._not_miners = {signer.ss58_address} | {hotkey for hotkey, _ in settings.reference_workers}

    def close(self) -> None:
        self._http.close()

    def sync(self) -> int:
        """Bring the miners table in line with the metagraph; returns the number of miners seen."""
        if self.chain is None:
            return 0
        try:
            metagraph = self.chain.metagraph()
        except ChainError as exc:
            # Keep routing on the last known picture; the next sync will try again.
            log.warning("cannot read the metagraph: %s", exc)
            return 0
        now = self.clock()
        seen = set()
        for neuron in metagraph.neurons:
            if neuron.hotkey in self._not_miners:
                continue  # the orchestrator's own hotkey and its reference workers are never miners
            endpoint = parse_endpoint(metagraph.endpoint_of(neuron.uid))
            self.store.upsert_miner(
                neuron.hotkey, neuron.uid, coldkey=neuron.coldkey, endpoint=endpoint, stake=neuron.stake, now=now
            )
            seen.add(neuron.hotkey)
        for miner in self.store.list_miners():
            # Deregistered (or replaced at its uid): keep the row for history, but without an
            # endpoint, so no probe brings it back into routing.
            if miner.hotkey not in seen and (miner.endpoint or miner.healthy):
                self.store.upsert_miner(miner.hotkey, miner.uid, coldkey=miner.coldkey, endpoint=None, now=now)
                self.store.record_probe(miner.hotkey, False, now=now)
        self._forget_candidates()
        return len(seen)

    def probe_all(self) -> None:
        miners = [m for m in self.store.list_miners() if m.endpoint or m.healthy]
        if not miners:
            return
        with ThreadPoolExecutor(min(MAX_PROBE_THREADS, len(miners)), thread_name_prefix="probe") as pool:
            list(pool.map(self.probe, miners))

    def probe(self, miner: Miner) -> None:
        """Probe one miner and record the result."""
        healthy, capacity, reason = self._check(miner)
        if healthy != miner.healthy:
            log.info("miner uid %s %s: %s", miner.uid, "healthy" if healthy else "unhealthy", reason or "ok")
        self.store.record_probe(
            miner.hotkey,
            healthy,
            capacity=capacity.model_dump(mode="json") if capacity else {},
            fingerprints=capacity.fingerprints if capacity else [],
            now=self.clock(),
        )
        self._forget_candidates()

    def _check(self, miner: Miner) -> tuple[bool, Capacity | None, str | None]:
        if not miner.endpoint:
            return False, None, "no endpoint committed"
        try:
            check_url(miner.endpoint, self.url_policy)
            health_url, _ = endpoint_url(miner.endpoint, "/health")
            if self._http.get(health_url).status_code != 200:
                return False, None, "/health did not answer 200"
            url, target = endpoint_url(miner.endpoint, "/v1/capacity")
            headers = sign_request(self.signer, "GET", target, b"", miner.hotkey)
            response = self._http.get(url, headers=headers)
        except OutboundError as exc:
            return False, None, str(exc)
        except httpx.HTTPError as exc:
            return False, None, f"unreachable: {type(exc).__name__}"
        if response.status_code != 200:
            return False, None, f"/v1/capacity answered HTTP {response.status_code}"
        try:
            capacity = Capacity.model_validate_json(response.content)
        except ValidationError:
            return False, None, "/v1/capacity answered something that is not a Capacity"
        if capacity.hotkey != miner.hotkey:
            # Anyone can commit any URL: an endpoint that is another hotkey's miner is not this one.
            return False, None, f"endpoint answers as {capacity.hotkey}, not {miner.hotkey}"
        if not (capacity.inference.available or capacity.training.available):
            return False, capacity, "no lane is serving"
        return True, capacity, None

    def mark_unhealthy(self, hotkey: str, reason: str) -> None:
        """Take a miner out of routing until its next successful probe."""
        log.info("miner %s marked unhealthy: %s", hotkey, reason)
        self.store.record_probe(hotkey, False, now=self.clock())
        self._forget_candidates()

    def cached_candidates(self) -> list[Candidate] | None:
        """What `candidates` would return without reading the store, or None when that is due."""
        with self._lock:
            if self._candidates is not None and time.monotonic() - self._candidates_at < self.settings.candidates_ttl_s:
                return self._candidates
            return None

    def candidates(self) -> list[Candidate]:
        """The healthy miners as routing sees them. Read from the store at most every
        `candidates_ttl_s`: a busy dispatcher runs a round per few jobs, and reloading the miners
        table each time cost as much as claiming the jobs."""
        cached = self.cached_candidates()
        if cached is not None:
            return cached
        with self._lock:
            generation = self._generation
        read_at = time.monotonic()
        candidates = [
            Candidate.from_capacity(m.hotkey, m.uid, m.endpoint or "", m.stake, m.score, m.healthy, m.capacity or {})
            for m in self.store.list_miners(healthy_only=True)
            # Another replica configured without this one's reference workers may have probed them.
            if m.hotkey not in self._not_miners
        ]
        with self._lock:
            if generation == self._generation:  # else a probe wrote since: keep nothing stale
                self._candidates, self._candidates_at = candidates, read_at
        return candidates

    def _forget_candidates(self) -> None:
        with self._lock:
            self._candidates = None
            self._generation += 1
