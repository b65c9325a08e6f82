"""Validator settings: flags, then DIPPY_VALIDATOR_* environment variables, then a TOML file
(`--config`), then the defaults below. On a local subnet (no `network`), what is still unset
after that comes from DATA_DIR/subnet.json (validator/cli.py)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from dippy_studio.settings import ServiceSettings
from dippy_studio.validator.weights import DEFAULT_EMA_ALPHA


class ValidatorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="DIPPY_VALIDATOR_", extra="forbid")

    # A local subnet's directory (`dippy-studio up`): its chain is DIR/chain.sqlite, and the
    # EMA state is kept in DIR/validator/ unless state_path says otherwise.
    data_dir: Path = Path(".dippy")
    # A real chain (finney, test, or ws://...) and the subnet's uid on it; None: the local chain.
    network: str | None = None
    netuid: int | None = None
    # None: DATA_DIR/validator/state-<hotkey>.json, one file per validator hotkey.
    state_path: Path | None = None

    # Whose scores to trust: the orchestrator's URL and the hotkey that must sign them.
    orchestrator_url: str | None = None
    orchestrator_hotkey: str | None = None

    # Signing key: a dev URI (local subnets) or a bittensor wallet.
    dev_key: str | None = None
    wallet_name: str | None = None
    wallet_hotkey: str = "default"
    wallet_path: Path | None = None

    # Weights (validator/weights.py): the EMA weight of each new round, a share burned to one uid,
    # hotkeys and coldkeys that never get weight, and the version_key sent with set_weights.
    alpha: float = Field(default=DEFAULT_EMA_ALPHA, gt=0, le=1)
    burn_uid: int | None = Field(default=None, ge=0)
    burn_share: float = Field(default=0.0, ge=0, le=1)
    banned_hotkeys: frozenset[str] = frozenset()
    banned_coldkeys: frozenset[str] = frozenset()
    version_key: int = Field(default=0, ge=0)
    # Scores whose window ended longer ago than this are refused (the previous weights are kept).
    max_scores_age_s: float = Field(default=3600.0, gt=0)

    # Talking to the orchestrator and the chain: each call is retried with exponential backoff.
    http_timeout_s: float = Field(default=10.0, gt=0)
    retries: int = Field(default=3, ge=0)
    backoff_s: float = Field(default=1.0, ge=0)
    # Blocks between rounds; None: the chain's tempo.
    tempo: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_key_source(self) -> ValidatorSettings:
        if self.dev_key and self.wallet_name:
            raise ValueError("give either dev_key or wallet_name, not both")
        return self
