"""Dev keys as ss58 addresses and a clock tests move by hand (imported by chain tests)."""

from __future__ import annotations

from bittensor.keyfiles import Keypair

T0 = 1_700_000_000.0


def address(uri: str) -> str:
    return str(Keypair.create_from_uri(uri).ss58_address)


ALICE = address("//Alice")
BOB = address("//Bob")
CHARLIE = address("//Charlie")
DAVE = address("//Dave")
EVE = address("//Eve")


class Clock:
    """Wall time that only moves when a test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance_blocks(self, blocks: int, block_time: float = 1.0) -> None:
        self.now += blocks * block_time
