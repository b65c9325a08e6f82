"""Settings in one place: environment variables prefixed DIPPY_ (nested with __), or defaults.

Example: DIPPY_DATA_DIR=/srv/dippy DIPPY_ENGINE__THREADS=4 dippy-studio generate ...
"""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from dippy_studio.engine.options import EngineOptions


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIPPY_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Path(".dippy")
    engine: EngineOptions = EngineOptions()
