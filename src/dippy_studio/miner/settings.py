"""Miner settings: flags, then DIPPY_MINER_* environment variables, then a TOML file (`--config`),
then the defaults below. Nested engine options: DIPPY_MINER_ENGINE__DEVICE, or `[engine]` in the file."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from dippy_studio.engine.options import EngineOptions
from dippy_studio.settings import ServiceSettings


class MinerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="DIPPY_MINER_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8091, ge=0, le=65535)
    data_dir: Path = Path(".dippy/miner")

    # Signing key: a dev URI (local subnets) or a bittensor wallet.
    dev_key: str | None = None
    wallet_name: str | None = None
    wallet_hotkey: str = "default"
    wallet_path: Path | None = None

    # Who may send jobs: allow-listed hotkeys, and/or registered hotkeys with enough stake.
    allow_hotkeys: list[str] = Field(default_factory=list)
    min_stake: float | None = None
    allow_any_sender: bool = False  # local development only
    max_signature_age: float = 10.0
    allowed_clock_skew: float = 2.0

    engine: EngineOptions = EngineOptions()
    serve_inference: bool = True
    serve_training: bool = True
    inference_workers: int = Field(default=1, ge=0, le=64)
    training_workers: int = Field(default=1, ge=0, le=16)
    inference_queue_limit: int = Field(default=64, ge=1)
    training_queue_limit: int = Field(default=4, ge=1)

    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_lora_bytes: int = Field(default=512 << 20, ge=1)
    # An image task's input image or mask, as downloaded (the pixel budget is the profile's).
    max_input_image_bytes: int = Field(default=32 << 20, ge=1)
    # A training dataset's download, and separately the images and captions it unpacks to.
    max_dataset_bytes: int = Field(default=1 << 30, ge=1)
    download_timeout: float = Field(default=120.0, gt=0)
    download_cache_bytes: int = Field(default=20 << 30, ge=1)
    # Outbound URLs to private/loopback/link-local addresses are refused unless allowed.
    allow_loopback_urls: bool = False
    allow_private_urls: bool = False

    callback_attempts: int = Field(default=6, ge=1, le=50)
    callback_backoff: float = Field(default=1.0, gt=0)
    callback_timeout: float = Field(default=30.0, gt=0)
    retry_after_seconds: int = Field(default=5, ge=1)
    # Progress reports to a job's sender (denoising and training steps): at most one per job this
    # often, the newest; 0 sends none.
    progress_interval_s: float = Field(default=0.5, ge=0.0)
    progress_timeout: float = Field(default=5.0, gt=0)

    # For demonstrating audits on a local subnet only: this share of jobs is faked, as a
    # dishonest miner would to save work: text-to-image run with a wrong seed, an image task
    # either rendered as text-to-image (input ignored) or answered with its input resized, training
    # not done at all (the LoRA delivered as initialised).
    cheat_rate: float = Field(default=0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_key_source(self) -> MinerSettings:
        if self.dev_key and self.wallet_name:
            raise ValueError("give either dev_key or wallet_name, not both")
        return self
