"""Orchestrator settings: flags, then DIPPY_ORCH_* environment variables, then a TOML file
(`--config`), then the defaults below."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from dippy_studio.orchestrator.blobs import parse_s3_url
from dippy_studio.orchestrator.db import default_url
from dippy_studio.orchestrator.models import DEFAULT_MODEL
from dippy_studio.protocol.limits import PROFILE_LIMITS
from dippy_studio.protocol.outbound import UrlPolicy
from dippy_studio.settings import ServiceSettings

# Long enough not to be guessed, and only characters a URL carries unescaped.
DASHBOARD_TOKEN = re.compile(r"[A-Za-z0-9._~-]{16,}")


class OrchestratorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="DIPPY_ORCH_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)
    # Processes serving the port, each a whole orchestrator on the shared database (serve.py).
    # One process leaves part of a core idle while it waits on locks and sockets, so a busy
    # orchestrator wants one more than the cores (bench/bench_throughput.py compares the counts).
    workers: int = Field(default=1, ge=1, le=64)
    # The database defaults to DIR/orchestrator.sqlite (the one `orchestrator keys` uses);
    # blobs live in DIR/blobs, the replay cache of signed requests in DIR/orchestrator-nonces.sqlite.
    data_dir: Path = Path(".dippy")
    db_url: str | None = None
    # Blobs (results, datasets, LoRAs) in S3-compatible object storage instead of DIR/blobs:
    # `s3://bucket/prefix`, which replicas on several machines must share (with one PostgreSQL
    # database). Credentials: the usual AWS variables (boto3's default chain). Each replica keeps
    # the blobs it reads in DIR/blob-cache. orchestrator/blobs.py.
    blob_url: str | None = None
    s3_endpoint_url: str | None = None  # None: AWS itself; else e.g. http://minio:9000
    s3_region: str | None = None
    # DIR/blob-cache's size limit: past it the least recently used blobs leave the disk (not the bucket).
    blob_cache_max_bytes: int = Field(default=10 << 30, ge=1 << 20)
    # The LocalChain file the miner registry syncs from (None: no chain; tests pass one in).
    chain_path: Path | None = None

    # Signing key: a dev URI (local subnets) or a bittensor wallet.
    dev_key: str | None = None
    wallet_name: str | None = None
    wallet_hotkey: str = "default"
    wallet_path: Path | None = None

    # What miners use to reach us: callbacks and blob downloads are built on it.
    public_url: str = "http://127.0.0.1:8090"
    # The models served (engine profile names, `protocol.limits.PROFILE_LIMITS`): `profile` is the
    # default, for requests that name no `model`; `models` are further ones (env: comma-separated
    # or a JSON list). A job goes only to miners serving its model, and is audited on a reference
    # of that model.
    profile: str = DEFAULT_MODEL
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Outbound URLs (miner endpoints, webhooks, dataset and LoRA downloads) to loopback or private
    # addresses are refused unless allowed: local subnets need loopback.
    allow_loopback_urls: bool = False
    allow_private_urls: bool = False
    max_signature_age: float = Field(default=10.0, gt=0)
    allowed_clock_skew: float = Field(default=2.0, ge=0)

    # Jobs: the client's deadline (default and cap) and how long one miner gets per attempt.
    inference_deadline_s: float = Field(default=120.0, gt=0)
    training_deadline_s: float = Field(default=3600.0, gt=0)
    max_deadline_s: float = Field(default=24 * 3600.0, gt=0)
    inference_attempt_timeout_s: float = Field(default=60.0, gt=0)
    training_attempt_timeout_s: float = Field(default=1800.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=20)
    # A retry with less time than this before the client's deadline would only fail later.
    min_attempt_s: float = Field(default=5.0, ge=0)
    # `Prefer: wait=N` is capped here so a client cannot hold a connection open indefinitely.
    max_wait_s: float = Field(default=60.0, ge=0)

    # Background loops (seconds between runs).
    dispatch_interval_s: float = Field(default=0.5, gt=0)
    dispatch_batch: int = Field(default=32, ge=1, le=1000)
    dispatch_timeout_s: float = Field(default=10.0, gt=0)
    # Sends in flight at once. Fewer starve a busy queue: each round can only claim as many jobs
    # as there are free slots, so a miner's latency, not the orchestrator, would bound throughput.
    dispatch_concurrency: int = Field(default=32, ge=1, le=256)
    sweep_interval_s: float = Field(default=2.0, gt=0)
    sync_interval_s: float = Field(default=60.0, gt=0)
    probe_interval_s: float = Field(default=15.0, gt=0)
    probe_timeout_s: float = Field(default=5.0, gt=0)
    # How long dispatch rounds reuse the miners table they last read (this process's own probes
    # refresh it at once; another replica's show within this time). 0 reads it every round.
    candidates_ttl_s: float = Field(default=1.0, ge=0)
    score_interval_s: float = Field(default=60.0, gt=0)
    # A miner that refused a job (429, 5xx, unreachable) gets none for this long (or its Retry-After).
    refusal_cooldown_s: float = Field(default=5.0, ge=0)
    # Singleton loops (sweep, sync, probe, scores, audits) run on one replica at a time, the
    # leader of each (orchestrator/leader.py); when it dies, another takes over within this bound.
    leader_takeover_s: float = Field(default=15.0, gt=0)
    # How often the audits leader looks for jobs other replicas picked for an audit (its own
    # picks wake it at once).
    audit_poll_s: float = Field(default=2.0, gt=0)

    # Scores: the window `GET /v1/scores` covers.
    score_window_s: float = Field(default=24 * 3600.0, gt=0)
    # What a job is worth per kind (`scoring.kind_weights`): the published design's training and
    # inference split, and the share of inference that goes to the editing kinds (edit, img2img,
    # inpaint), the rest to text-to-image, as the live subnet splits it.
    training_weight: float = Field(default=0.7, ge=0, allow_inf_nan=False)
    inference_weight: float = Field(default=0.3, ge=0, allow_inf_nan=False)
    edit_share: float = Field(default=0.8, ge=0, le=1, allow_inf_nan=False)
    # The largest input image (edit, img2img, inpaint) a request may send, upload, data: URI or
    # URL, in bytes as sent; its pixels are bounded by the profile (`ProfileLimits.max_input_pixels`).
    max_input_image_bytes: int = Field(default=32 << 20, ge=1024)
    # Audits: a sample of succeeded jobs (orchestrator.audit.SamplerPolicy) is checked on a
    # reference engine of `profile`, built at the first audit (weights from audit_model_path):
    # inference by re-running it, training by the LoRA's loss on held-out images.
    audit: bool = True
    audit_model_path: Path | None = None
    # Whether this process may judge the audits (hold the "audits" role and build reference
    # models). False on API replicas when `dippy-studio orchestrator audits` runs on a machine
    # of its own (one with the memory for a large model's training audits, say): they still pick
    # the jobs they receive and flag them in the database, where that process finds them.
    judge_audits: bool = True
    # Reference workers: trusted miner processes (`dippy-studio miner serve` of `profile`, run by
    # the subnet owner) that inference audits re-run on instead of the in-process engine, as
    # "HOTKEY@URL" (env: a JSON list). They get no client jobs. A worker on the miners' hardware
    # and dtype makes exact-hash audits of GPU miners possible. Empty: the in-process engine.
    audit_references: list[str] = Field(default_factory=list)
    # How long one re-run on a reference worker may take, queueing included, before the audit
    # is inconclusive.
    audit_reference_timeout_s: float = Field(default=300.0, gt=0)
    # The sampler's rates (defaults from bench/bench_audit.py; a local demo audits every job).
    audit_base_rate: float = Field(default=0.06, ge=0, le=1)
    audit_probation_rate: float = Field(default=0.25, ge=0, le=1)
    audit_probation_jobs: int = Field(default=30, ge=0)
    audit_max_gap: int = Field(default=18, ge=0)
    # With audits on, this share of a training dataset's images (rounded, at least one) is kept
    # from the miner to measure the LoRA on; datasets under the minimum are not split, and their
    # training audits are inconclusive.
    audit_heldout_share: float = Field(default=0.2, ge=0, lt=1)
    audit_heldout_min_images: int = Field(default=5, ge=2)

    # The operator dashboard at /dashboard (orchestrator/dashboard.py). It shows every client's
    # prompts and images, so it is off (404) until an operator token is set; then every path
    # under /dashboard needs it (orchestrator/dashboard_access.py). `up` sets one for its subnet.
    dashboard: bool = True
    dashboard_token: SecretStr | None = None
    dashboard_gallery: bool = True
    dashboard_refresh_s: float = Field(default=2.0, gt=0)
    dashboard_window_s: float = Field(default=3600.0, gt=0)

    # The admin HTTP API under /v1/admin (orchestrator/admin_api.py): create, list and revoke API
    # keys, set their quotas, read their usage. Off (404) until a token is set; then every call
    # needs `Authorization: Bearer <admin_token>`.
    admin_token: SecretStr | None = None

    # Webhooks to clients: Standard Webhooks, retried with exponential backoff.
    webhook_attempts: int = Field(default=8, ge=1, le=50)
    webhook_backoff_s: float = Field(default=2.0, gt=0)
    webhook_max_backoff_s: float = Field(default=600.0, gt=0)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_interval_s: float = Field(default=1.0, gt=0)

    # Uploads and downloads. A training dataset is bounded twice by max_dataset_bytes: as the
    # archive, and as the images and captions it unpacks to (images do not shrink in a zip, so
    # only a zip bomb unpacks to much more than it weighs).
    max_dataset_bytes: int = Field(default=256 << 20, ge=1024)
    max_lora_bytes: int = Field(default=512 << 20, ge=1024)
    max_result_bytes: int = Field(default=512 << 20, ge=1024)
    # A client-given URL's download (input image, LoRA, dataset), from connecting to its last byte.
    download_timeout_s: float = Field(default=60.0, gt=0)
    # A LoRA's check (read and fit to the model's layers, in the model-code child process) that
    # takes longer is stopped and answered 503: it bounds a check that hangs, far above the few
    # seconds the largest allowed LoRA takes.
    lora_check_timeout_s: float = Field(default=120.0, gt=0)

    @property
    def url_policy(self) -> UrlPolicy:
        """Which addresses outbound URLs may reach (`allow_loopback_urls`, `allow_private_urls`)."""
        return UrlPolicy(self.allow_loopback_urls, self.allow_private_urls)

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("public_url must be an http:// or https:// URL")
        return url.rstrip("/")

    @field_validator("profile")
    @classmethod
    def _profile(cls, name: str) -> str:
        return _known_model(name, "profile")

    @field_validator("models", mode="before")
    @classmethod
    def _models_text(cls, value: Any) -> Any:
        # From the environment or a flag: "a,b" or a JSON list.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [name.strip() for name in text.split(",") if name.strip()]
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, names: list[str]) -> list[str]:
        return list(dict.fromkeys(_known_model(name, "models") for name in names))

    @field_validator("audit_references")
    @classmethod
    def _audit_references(cls, entries: list[str]) -> list[str]:
        workers = [reference_worker(entry) for entry in entries]
        hotkeys = [hotkey for hotkey, _ in workers]
        if len(set(hotkeys)) != len(hotkeys):
            raise ValueError("audit_references names a hotkey twice")
        return [f"{hotkey}@{url}" for hotkey, url in workers]

    @field_validator("dashboard_token", "admin_token")
    @classmethod
    def _operator_token(cls, token: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        # Each guards every client's data (the dashboard's token also travels in a URL, as typed).
        if token is not None and not DASHBOARD_TOKEN.fullmatch(token.get_secret_value()):
            raise ValueError(
                f"{info.field_name} must be at least 16 characters of A-Z a-z 0-9 . _ ~ - "
                "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return token

    @field_validator("db_url")
    @classmethod
    def _db_url(cls, url: str | None) -> str | None:
        if url is not None and in_memory_database(url):
            raise ValueError(IN_MEMORY_REFUSAL.format(url=url))
        return url

    @field_validator("blob_url")
    @classmethod
    def _blob_url(cls, url: str | None) -> str | None:
        if url is not None:
            parse_s3_url(url)
        return url

    @field_validator("s3_endpoint_url")
    @classmethod
    def _s3_endpoint_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError("s3_endpoint_url must be an http:// or https:// URL")
        return url

    @model_validator(mode="after")
    def _s3_needs_blob_url(self) -> OrchestratorSettings:
        if self.blob_url is None and (self.s3_endpoint_url or self.s3_region):
            raise ValueError("s3_endpoint_url and s3_region need blob_url (s3://bucket/prefix)")
        return self

    @model_validator(mode="after")
    def _one_key_source(self) -> OrchestratorSettings:
        if self.dev_key and self.wallet_name:
            raise ValueError("give either dev_key or wallet_name, not both")
        return self

    @property
    def served_models(self) -> list[str]:
        """Every model served, the default first."""
        return list(dict.fromkeys([self.profile, *self.models]))

    def model_for(self, requested: str | None) -> str:
        """The model a request is for: the one it names, or the default; ValueError naming the
        served models when it names another."""
        if requested is None:
            return self.profile
        if requested not in self.served_models:
            raise ValueError(f"model {requested!r} is not served here; models: {', '.join(self.served_models)}")
        return requested

    @property
    def reference_workers(self) -> list[tuple[str, str]]:
        """`audit_references` as (hotkey, base URL) pairs."""
        return [reference_worker(entry) for entry in self.audit_references]

    @property
    def database_url(self) -> str:
        return self.db_url or default_url(self.data_dir)


IN_MEMORY_REFUSAL = (
    "{url} is an in-memory SQLite database: every connection to it is a new, empty database, so "
    "nothing (keys, jobs, scores) would be kept; give a file, sqlite:///PATH, or postgresql://..."
)


def in_memory_database(url: str) -> bool:
    """Whether `url` names an in-memory SQLite database (`sqlite://`, `sqlite:///:memory:`, a
    `file::memory:` or `mode=memory` URI). False for any other URL, a malformed one included:
    that is for the database code to refuse, with its own reason."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return False
    if parsed.get_backend_name() != "sqlite":
        return False
    database = parsed.database or ""
    return (
        database in ("", ":memory:")
        or database.startswith("file::memory:")
        or "mode=memory" in database
        or parsed.query.get("mode") == "memory"
    )


def _known_model(name: str, setting: str) -> str:
    if name not in PROFILE_LIMITS:
        raise ValueError(f"{setting}: unknown model {name!r}; known models: {', '.join(PROFILE_LIMITS)}")
    return name


# An ss58 address: base58 (no 0, O, I or l), 46 to 48 characters for the usual prefixes.
_SS58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]{46,48}")


def reference_worker(entry: str) -> tuple[str, str]:
    """(hotkey, base URL) from an `audit_references` entry "HOTKEY@URL"; ValueError says what is wrong."""
    hotkey, at, url = entry.strip().partition("@")
    usage = f"audit_references entry {entry!r} is not HOTKEY@URL (e.g. 5F...@http://10.0.0.5:8091)"
    if not at or not _SS58.fullmatch(hotkey):
        raise ValueError(f"{usage}: the part before '@' must be the worker's ss58 hotkey")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a malformed port)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"{usage}: the part after '@' must be an http:// or https:// base URL")
    return hotkey, url.rstrip("/")
