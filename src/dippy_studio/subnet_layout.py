"""A local subnet's layout (DIR/subnet.json): ports, hotkeys and addresses.

Written by `dippy-studio up` (`localnet`), read back by a second `up` on the same directory,
by the demo and by `validator run --data-dir`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import Field, TypeAdapter, ValidationError

SUBNET_FILE = "subnet.json"
Port = Annotated[int, Field(ge=1, le=65535)]
Name = Annotated[str, Field(min_length=1)]


class SubnetLayoutError(ValueError):
    """DIR/subnet.json cannot be read as a layout that `up` wrote: which file, and what is wrong."""


@dataclass
class MinerSpec:
    name: Name
    port: Port
    hotkey: Name
    cheater: bool = False


@dataclass
class SubnetLayout:
    data_dir: str
    block_time: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    tempo: Annotated[int, Field(ge=2)]
    orchestrator_port: Port
    orchestrator_url: Name
    orchestrator_hotkey: Name
    validator_hotkey: Name
    owner_hotkey: Name
    miners: Annotated[list[MinerSpec], Field(min_length=1)] = field(default_factory=list)
    validator_wallet: str = "validator"

    @property
    def root(self) -> Path:
        return Path(self.data_dir)

    def save(self) -> None:
        # Written whole or not at all: its hotkeys and ports are the subnet's, and a second `up`
        # resumes from them.
        path = self.root / SUBNET_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, root: Path) -> SubnetLayout | None:
        """The layout in ROOT/subnet.json, None when there is none; `SubnetLayoutError` when the
        file is not one `up` wrote (never repaired here: it is the operator's to fix or move)."""
        path = root / SUBNET_FILE
        if not path.is_file():
            return None
        try:
            # Strict: JSON's true is not a port, nor "7" a tempo.
            return _LAYOUT.validate_json(path.read_bytes(), strict=True)
        except OSError as exc:
            raise SubnetLayoutError(f"cannot read {path}: {exc.strerror or exc}") from None
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, error['loc'])) or 'the file'}: {error['msg']}" for error in exc.errors()[:3]
            )
            raise SubnetLayoutError(
                f"{path} is not a subnet layout ({problems}); fix it, or move it aside to start anew"
            ) from None


_LAYOUT = TypeAdapter(SubnetLayout)
