from __future__ import annotations

import pytest

from dippy_studio.protocol import MemoryNonceStore, SenderPolicy, Signer, signer_from_uri

# A fixed wall clock: tests move time by passing `now`, never by sleeping.
T0 = 1_700_000_000.0


@pytest.fixture(scope="session")
def alice() -> Signer:
    return signer_from_uri("//Alice")


@pytest.fixture(scope="session")
def bob() -> Signer:
    return signer_from_uri("//Bob")


@pytest.fixture(scope="session")
def charlie() -> Signer:
    return signer_from_uri("//Charlie")


@pytest.fixture
def store() -> MemoryNonceStore:
    return MemoryNonceStore(clock=lambda: T0)


@pytest.fixture
def open_policy() -> SenderPolicy:
    return SenderPolicy.open()
