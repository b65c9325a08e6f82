"""Settings, all through pydantic-settings.

`Settings` is for the engine commands (`generate`, `train`): environment variables prefixed
DIPPY_ (nested with __), or defaults. Example:
DIPPY_DATA_DIR=/srv/dippy DIPPY_ENGINE__THREADS=4 dippy-studio generate ...

`ServiceSettings` is the base of each service's settings (miner, orchestrator, validator): the
subclass holds the fields and their defaults and names its own environment prefix.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Self

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from dippy_studio.engine.options import EngineOptions


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIPPY_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Path(".dippy")
    engine: EngineOptions = EngineOptions()


class ServiceSettings(BaseSettings):
    """Settings of a service. `load` reads them, highest first: keyword arguments (the
    command-line flags), environment variables, an optional TOML file, the class's defaults."""

    # A timeout, interval or limit of inf or nan is a typo, never a setting: `x > inf` never holds.
    model_config = SettingsConfigDict(allow_inf_nan=False)

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Self:
        """Overrides that are None are left out: a flag not given hides neither the environment
        nor the file."""
        if config_file is not None and not config_file.is_file():
            raise ValueError(f"config file {config_file} does not exist")

        class _WithFile(cls):  # type: ignore[valid-type, misc]
            @classmethod
            def settings_customise_sources(
                cls,
                settings_cls: type[BaseSettings],
                init_settings: PydanticBaseSettingsSource,
                env_settings: PydanticBaseSettingsSource,
                dotenv_settings: PydanticBaseSettingsSource,
                file_secret_settings: PydanticBaseSettingsSource,
            ) -> tuple[PydanticBaseSettingsSource, ...]:
                sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
                if config_file is not None:
                    sources += (TomlConfigSettingsSource(settings_cls, toml_file=config_file),)
                return sources

        try:
            loaded = _WithFile(**{k: v for k, v in overrides.items() if v is not None})
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # raised by the file's source only
            raise ValueError(f"config file {config_file} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise ValueError(f"config file {config_file} cannot be read: {exc.strerror or exc}") from None
        # Built again as `cls` itself from only what some source gave, so `model_fields_set`
        # still tells a value someone set from a default.
        return cls.model_validate(loaded.model_dump(include=loaded.model_fields_set))
