"""What services say to each other: request signing and verification (btauth/1, Epistula v2),
signing keys, and replay-protection stores.

The names below load their module on first use (PEP 562), so importing a light submodule
(`protocol.limits`, `protocol.webhooks`, ...) does not pull in bittensor and the signing stack:
the client SDK and the orchestrator's start stay light."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dippy_studio.protocol.auth import (
        DEFAULT_ALLOWED_SKEW,
        DEFAULT_MAX_AGE,
        SCHEMES,
        AuthError,
        BadSignature,
        Caller,
        FutureRequest,
        InsufficientStake,
        MalformedAuth,
        MissingAuth,
        ReplayedRequest,
        Scheme,
        SenderNotAllowed,
        SenderPolicy,
        SenderRefused,
        StakeLookup,
        StaleRequest,
        UnregisteredSender,
        WrongReceiver,
        WrongTarget,
        detect_scheme,
        sign_btauth,
        sign_epistula,
        sign_request,
        verify_request,
    )
    from dippy_studio.protocol.keys import (
        InvalidKeyUriError,
        Signer,
        SigningKeyError,
        WalletExistsError,
        WalletLockedError,
        WalletNotFoundError,
        create_dev_wallet,
        load_signer,
        signer_from_uri,
        signer_from_wallet,
    )
    from dippy_studio.protocol.nonces import (
        DEFAULT_RETENTION,
        MemoryNonceStore,
        NonceStore,
        SqliteNonceStore,
    )

# Each public name and the submodule that defines it.
_HOMES = {
    "AuthError": "auth",
    "BadSignature": "auth",
    "Caller": "auth",
    "DEFAULT_ALLOWED_SKEW": "auth",
    "DEFAULT_MAX_AGE": "auth",
    "FutureRequest": "auth",
    "InsufficientStake": "auth",
    "MalformedAuth": "auth",
    "MissingAuth": "auth",
    "ReplayedRequest": "auth",
    "SCHEMES": "auth",
    "Scheme": "auth",
    "SenderNotAllowed": "auth",
    "SenderPolicy": "auth",
    "SenderRefused": "auth",
    "StakeLookup": "auth",
    "StaleRequest": "auth",
    "UnregisteredSender": "auth",
    "WrongReceiver": "auth",
    "WrongTarget": "auth",
    "detect_scheme": "auth",
    "sign_btauth": "auth",
    "sign_epistula": "auth",
    "sign_request": "auth",
    "verify_request": "auth",
    "InvalidKeyUriError": "keys",
    "Signer": "keys",
    "SigningKeyError": "keys",
    "WalletExistsError": "keys",
    "WalletLockedError": "keys",
    "WalletNotFoundError": "keys",
    "create_dev_wallet": "keys",
    "load_signer": "keys",
    "signer_from_uri": "keys",
    "signer_from_wallet": "keys",
    "DEFAULT_RETENTION": "nonces",
    "MemoryNonceStore": "nonces",
    "NonceStore": "nonces",
    "SqliteNonceStore": "nonces",
}

__all__ = [
    "DEFAULT_ALLOWED_SKEW",
    "DEFAULT_MAX_AGE",
    "DEFAULT_RETENTION",
    "SCHEMES",
    "AuthError",
    "BadSignature",
    "Caller",
    "FutureRequest",
    "InsufficientStake",
    "InvalidKeyUriError",
    "MalformedAuth",
    "MemoryNonceStore",
    "MissingAuth",
    "NonceStore",
    "ReplayedRequest",
    "Scheme",
    "SenderNotAllowed",
    "SenderPolicy",
    "SenderRefused",
    "Signer",
    "SigningKeyError",
    "SqliteNonceStore",
    "StakeLookup",
    "StaleRequest",
    "UnregisteredSender",
    "WalletExistsError",
    "WalletLockedError",
    "WalletNotFoundError",
    "WrongReceiver",
    "WrongTarget",
    "create_dev_wallet",
    "detect_scheme",
    "load_signer",
    "sign_btauth",
    "sign_epistula",
    "sign_request",
    "signer_from_uri",
    "signer_from_wallet",
    "verify_request",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
