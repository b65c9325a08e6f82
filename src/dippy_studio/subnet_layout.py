"""A local subnet's layout (DIR/subnet.json): ports, hotkeys and addresses.

Written by `dippy-studio up` (`localnet`), read back by a second `up` on the same directory,
by the demo and by `validator run --data-dir`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUBNET_FILE = "subnet.json"


@dataclass
class MinerSpec:
    name: str
    port: int
    hotkey: str
    cheater: bool = False


@dataclass
class SubnetLayout:
    data_dir: str
    block_time: float
    tempo: int
    orchestrator_port: int
    orchestrator_url: str
    orchestrator_hotkey: str
    validator_hotkey: str
    owner_hotkey: str
    miners: list[MinerSpec] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return Path(self.data_dir)

    def save(self) -> None:
        data = asdict(self)
        data["validator_wallet"] = "validator"
        (self.root / SUBNET_FILE).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, root: Path) -> SubnetLayout | None:
        path = root / SUBNET_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        data.pop("validator_wallet", None)
        data["miners"] = [MinerSpec(**m) for m in data.get("miners", [])]
        return cls(**data)
