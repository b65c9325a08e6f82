"""Signed requests between miners, the orchestrator and validators.

Two wire schemes, one entry point (`verify_request`):

- btauth/1, the primary scheme, through `bittensor.http_auth`: the signature covers the
  method, the path with its query string, sha256 of the body, a nanosecond nonce, the
  sender and the receiver.
- Epistula v2, which most existing subnet orchestrators speak: the signature covers
  `sha256(body).hexdigest() + "." + uuid + "." + timestamp_ms + "." + signed_for`. It does
  not cover the method or the path: an intercepted request could be re-aimed at another
  endpoint of the same receiver. The UUID replay check (one store per receiver) makes
  sure it is accepted at most once, wherever it lands; TLS keeps it from being seen.

Verification order, for both: header shape, receiver binding, freshness, signature,
sender policy, replay. The replay store is written last, so neither forged requests nor
refused senders can fill it or burn a legitimate sender's nonces.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid as uuid_lib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

from bittensor import http_auth
from bittensor.sp_core import CRYPTO_SR25519
from bittensor.sp_core import verify as sp_verify

from dippy_studio.protocol.keys import Signer
from dippy_studio.protocol.nonces import NonceStore

__all__ = [
    "DEFAULT_ALLOWED_SKEW",
    "DEFAULT_MAX_AGE",
    "EPISTULA_HEADERS",
    "SCHEMES",
    "AuthError",
    "BadSignature",
    "Caller",
    "Checked",
    "FutureRequest",
    "InsufficientStake",
    "MalformedAuth",
    "MissingAuth",
    "ReplayedRequest",
    "Scheme",
    "SenderNotAllowed",
    "SenderPolicy",
    "SenderRefused",
    "StakeLookup",
    "StaleRequest",
    "UnregisteredSender",
    "WrongReceiver",
    "check_nonce_window",
    "check_request",
    "detect_scheme",
    "epistula_message",
    "sign_btauth",
    "sign_epistula",
    "sign_request",
    "verify_request",
]

Scheme = Literal["btauth", "epistula"]
SCHEMES: tuple[Scheme, ...] = ("btauth", "epistula")

DEFAULT_MAX_AGE: float = http_auth.DEFAULT_MAX_AGE
DEFAULT_ALLOWED_SKEW: float = http_auth.DEFAULT_ALLOWED_SKEW

EPISTULA_VERSION = "2"
HEADER_EPISTULA_VERSION = "Epistula-Version"
HEADER_EPISTULA_TIMESTAMP = "Epistula-Timestamp"
HEADER_EPISTULA_UUID = "Epistula-Uuid"
HEADER_EPISTULA_SIGNED_BY = "Epistula-Signed-By"
HEADER_EPISTULA_SIGNED_FOR = "Epistula-Signed-For"
HEADER_EPISTULA_SIGNATURE = "Epistula-Request-Signature"
EPISTULA_HEADERS = (
    HEADER_EPISTULA_VERSION,
    HEADER_EPISTULA_TIMESTAMP,
    HEADER_EPISTULA_UUID,
    HEADER_EPISTULA_SIGNED_BY,
    HEADER_EPISTULA_SIGNED_FOR,
    HEADER_EPISTULA_SIGNATURE,
)


# --- errors ---------------------------------------------------------------------------


class AuthError(Exception):
    """A request was refused. `reason` is safe to return to the (unauthenticated) caller:
    it never echoes signatures or bodies. `status_code` is the HTTP status to answer."""

    status_code: ClassVar[int] = 401

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MissingAuth(AuthError):
    """No signature headers of any accepted scheme."""


class MalformedAuth(AuthError):
    """Signature headers are present but incomplete, unparseable or of a refused scheme."""


class WrongReceiver(AuthError):
    """The request was signed for another hotkey, or for no particular receiver."""


class StaleRequest(AuthError):
    """The signature timestamp is older than `max_age`."""


class FutureRequest(AuthError):
    """The signature timestamp is further ahead than `allowed_skew` (a clock is off)."""


class ReplayedRequest(AuthError):
    """This nonce or UUID was already accepted from this hotkey."""


class BadSignature(AuthError):
    """The signature does not verify: forged, or the body, method, path or headers changed.

    A tampered body lands here too: neither scheme sends the body hash in a header, so a
    changed body and a wrong signature cannot be told apart.
    """


class SenderRefused(AuthError):
    """The sender is authenticated but the policy does not let it in."""

    status_code: ClassVar[int] = 403


class SenderNotAllowed(SenderRefused):
    """Not on the allow-list, and no stake rule lets it in."""


class UnregisteredSender(SenderRefused):
    """The hotkey is not registered on the subnet."""


class InsufficientStake(SenderRefused):
    """The hotkey is registered but holds less stake than required."""


# --- the authenticated caller -----------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who sent a verified request."""

    hotkey_ss58: str
    scheme: Scheme
    # The btauth nonce (decimal nanoseconds) or the Epistula UUID: unique per sender,
    # so it can serve as an idempotency or log key.
    request_id: str
    # Unix seconds by the sender's clock.
    signed_at: float


# --- sender policy ----------------------------------------------------------------------


class StakeLookup(Protocol):
    """What the policy needs from the chain."""

    def stake_of(self, hotkey_ss58: str) -> float | None:
        """The hotkey's stake (TAO) on this subnet, or None if it is not registered."""
        ...


class SenderPolicy:
    """Which authenticated hotkeys may call a service.

    - A hotkey on `allowed_hotkeys` passes without a chain lookup.
    - With `min_stake` (and a `stake_lookup`), any hotkey registered on the subnet with at
      least that stake passes; `min_stake=0` admits every registered hotkey.
    - `allow_any` admits every correctly signed hotkey: local development only.

    A policy must say who gets in: one that configures nothing raises at construction,
    so a misconfigured service fails at startup rather than serving everyone or no one.
    Errors raised by `stake_lookup` (chain unreachable) propagate: that is an outage, not
    a refusal, and the service should answer 5xx.
    """

    def __init__(
        self,
        *,
        allowed_hotkeys: Iterable[str] = (),
        min_stake: float | None = None,
        stake_lookup: StakeLookup | None = None,
        allow_any: bool = False,
    ) -> None:
        self.allowed_hotkeys = frozenset(allowed_hotkeys)
        self.min_stake = min_stake
        self.stake_lookup = stake_lookup
        self.allow_any = allow_any
        if min_stake is not None and min_stake < 0:
            raise ValueError("min_stake must be >= 0")
        if (min_stake is None) != (stake_lookup is None):
            raise ValueError("min_stake and stake_lookup go together")
        if allow_any and (self.allowed_hotkeys or min_stake is not None):
            raise ValueError("allow_any admits everyone; do not combine it with other rules")
        if not (allow_any or self.allowed_hotkeys or min_stake is not None):
            raise ValueError(
                "an empty sender policy would refuse everyone: give allowed_hotkeys, "
                "min_stake with a stake_lookup, or allow_any=True for local development"
            )

    @classmethod
    def allow_list(cls, hotkeys: Iterable[str]) -> SenderPolicy:
        return cls(allowed_hotkeys=hotkeys)

    @classmethod
    def registered(cls, stake_lookup: StakeLookup, min_stake: float = 0.0) -> SenderPolicy:
        return cls(stake_lookup=stake_lookup, min_stake=min_stake)

    @classmethod
    def open(cls) -> SenderPolicy:
        """Admit any correctly signed hotkey (local development)."""
        return cls(allow_any=True)

    def check(self, hotkey_ss58: str) -> None:
        """Return if the hotkey may call; raise a `SenderRefused` subclass otherwise."""
        if self.allow_any or hotkey_ss58 in self.allowed_hotkeys:
            return
        if self.min_stake is None or self.stake_lookup is None:
            raise SenderNotAllowed("this hotkey is not on the allow-list")
        stake = self.stake_lookup.stake_of(hotkey_ss58)
        if stake is None:
            raise UnregisteredSender("this hotkey is not registered on the subnet")
        if stake < self.min_stake:
            raise InsufficientStake(f"this hotkey holds less than the required {self.min_stake:g} stake")

    def __repr__(self) -> str:
        return (
            f"SenderPolicy(allowed_hotkeys={len(self.allowed_hotkeys)}, min_stake={self.min_stake}, "
            f"allow_any={self.allow_any})"
        )


# --- signing ----------------------------------------------------------------------------


_nonce_lock = threading.Lock()
_last_nonce_ns = 0


def _fresh_nonce_ns() -> int:
    # bittensor signs with time.time_ns() as is; two requests signed within one clock
    # tick (coarse clocks, tight loops) would share a nonce and the second would be
    # refused as a replay. Keep nonces strictly increasing within the process.
    global _last_nonce_ns
    with _nonce_lock:
        _last_nonce_ns = max(time.time_ns(), _last_nonce_ns + 1)
        return _last_nonce_ns


def sign_btauth(
    signer: Signer,
    method: str,
    path: str,
    body: bytes,
    receiver_ss58: str,
    *,
    now: float | None = None,
) -> dict[str, str]:
    """btauth/1 headers. `path` is the request target as sent, query string included."""
    nonce_ns = _fresh_nonce_ns() if now is None else round(now * 1e9)
    return http_auth.sign(signer, method=method, path=path, body=body, receiver_ss58=receiver_ss58, nonce_ns=nonce_ns)


def epistula_message(body: bytes, uuid: str, timestamp_ms: str, signed_for: str) -> bytes:
    """The exact bytes an Epistula v2 signature covers."""
    return f"{hashlib.sha256(body).hexdigest()}.{uuid}.{timestamp_ms}.{signed_for}".encode()


def sign_epistula(
    signer: Signer,
    body: bytes,
    receiver_ss58: str,
    *,
    now: float | None = None,
    uuid: str | None = None,
) -> dict[str, str]:
    """Epistula v2 headers, bound to `receiver_ss58`."""
    # Epistula has no crypto-type header; verifiers assume sr25519.
    if signer.crypto_type != CRYPTO_SR25519:
        raise ValueError("Epistula signatures must be sr25519")
    timestamp_ms = str(time.time_ns() // 1_000_000 if now is None else round(now * 1000))
    request_uuid = str(uuid_lib.uuid4()) if uuid is None else uuid
    signature = signer.sign(epistula_message(body, request_uuid, timestamp_ms, receiver_ss58))
    return {
        HEADER_EPISTULA_VERSION: EPISTULA_VERSION,
        HEADER_EPISTULA_TIMESTAMP: timestamp_ms,
        HEADER_EPISTULA_UUID: request_uuid,
        HEADER_EPISTULA_SIGNED_BY: signer.ss58_address,
        HEADER_EPISTULA_SIGNED_FOR: receiver_ss58,
        HEADER_EPISTULA_SIGNATURE: "0x" + bytes(signature).hex(),
    }


def sign_request(
    signer: Signer,
    method: str,
    path: str,
    body: bytes,
    receiver_ss58: str,
    scheme: Scheme = "btauth",
    *,
    now: float | None = None,
) -> dict[str, str]:
    """Headers that authenticate an outgoing request (or a miner's callback) as `signer`.

    Sign the exact bytes you send; send a fresh signature with every retry.
    """
    if scheme == "btauth":
        return sign_btauth(signer, method, path, body, receiver_ss58, now=now)
    if scheme == "epistula":
        return sign_epistula(signer, body, receiver_ss58, now=now)
    raise ValueError(f"unknown signature scheme {scheme!r}; expected one of {SCHEMES}")


# --- verification -----------------------------------------------------------------------


def detect_scheme(headers: Mapping[str, str]) -> Scheme:
    """Which scheme signed these headers; MissingAuth if none, MalformedAuth if both."""
    names = {key.lower() for key in headers}
    btauth = any(name.startswith("x-bittensor-") for name in names)
    epistula = any(name.startswith("epistula-") for name in names)
    if btauth and epistula:
        raise MalformedAuth("request carries both btauth and Epistula headers; send one scheme")
    if btauth:
        return "btauth"
    if epistula:
        return "epistula"
    raise MissingAuth("request is not signed (no btauth or Epistula headers)")


@dataclass(frozen=True)
class Checked:
    """A request whose signature, receiver, freshness and sender policy checked out, still to be
    recorded in the replay store (`claim`): the last step of `verify_request`, apart so that a
    server can run it where its other database work runs."""

    caller: Caller
    # Records the nonce or UUID; False when it was seen before.
    record: Callable[[NonceStore], bool]

    def claim(self, nonce_store: NonceStore) -> Caller:
        """The caller, once its nonce (or UUID) is recorded; `ReplayedRequest` if it was already."""
        if not self.record(nonce_store):
            what = "nonce" if self.caller.scheme == "btauth" else "UUID"
            raise ReplayedRequest(f"this {what} was already accepted from this hotkey")
        return self.caller


class _DeferredNonce:
    """Hands bittensor a store that accepts everything, so that the real replay check can
    run after the sender policy. No `retention` attribute: the window is checked here."""

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool:
        return True


def _check_btauth(
    headers: Mapping[str, str],
    body: bytes,
    *,
    method: str,
    path: str,
    receiver_ss58: str,
    max_age: float,
    allowed_skew: float,
    now_ns: int,
) -> Checked:
    try:
        verified = http_auth.verify(
            headers,
            body,
            method=method,
            path=path,
            self_hotkey_ss58=receiver_ss58,
            max_age=max_age,
            allowed_skew=allowed_skew,
            require_receiver=True,
            nonce_store=_DeferredNonce(),
            now_ns=now_ns,
        )
    except http_auth.StaleRequest as error:
        # bittensor raises one type for both directions; the nonce parsed fine if we got
        # this far, so its sign relative to now tells which.
        nonce_ns = int({k.lower(): v for k, v in headers.items()}[http_auth.HEADER_NONCE.lower()])
        kind = FutureRequest if nonce_ns > now_ns else StaleRequest
        raise kind(str(error)) from None
    except http_auth.MalformedAuth as error:
        raise MalformedAuth(str(error)) from None
    except http_auth.WrongReceiver as error:
        raise WrongReceiver(str(error)) from None
    except http_auth.BadSignature as error:
        raise BadSignature(str(error)) from None
    except http_auth.ReplayedRequest as error:  # not raised with _DeferredNonce; kept for safety
        raise ReplayedRequest(str(error)) from None

    hotkey, nonce_ns = verified.hotkey_ss58, verified.nonce_ns
    caller = Caller(hotkey_ss58=hotkey, scheme="btauth", request_id=str(nonce_ns), signed_at=nonce_ns / 1e9)
    return Checked(caller, lambda store: store.check_and_store(hotkey, nonce_ns))


def _check_epistula(
    headers: Mapping[str, str],
    body: bytes,
    *,
    receiver_ss58: str,
    max_age: float,
    allowed_skew: float,
    now_ns: int,
) -> Checked:
    lowered = {key.lower(): value for key, value in headers.items()}

    def required(name: str) -> str:
        value = lowered.get(name.lower())
        if not value:
            raise MalformedAuth(f"missing {name}")
        return value

    if required(HEADER_EPISTULA_VERSION) != EPISTULA_VERSION:
        raise MalformedAuth(f"unsupported {HEADER_EPISTULA_VERSION} (expected {EPISTULA_VERSION!r})")
    timestamp_raw = required(HEADER_EPISTULA_TIMESTAMP)
    # int() would also take "+5", " 5" and "5_000"; the signed string must be plain digits.
    if not (timestamp_raw.isascii() and timestamp_raw.isdigit()):
        raise MalformedAuth(f"{HEADER_EPISTULA_TIMESTAMP} is not a decimal integer (milliseconds)")
    uuid_raw = required(HEADER_EPISTULA_UUID)
    try:
        request_uuid = str(uuid_lib.UUID(uuid_raw))
    except ValueError:
        raise MalformedAuth(f"{HEADER_EPISTULA_UUID} is not a UUID") from None
    sender = required(HEADER_EPISTULA_SIGNED_BY)
    signature_raw = required(HEADER_EPISTULA_SIGNATURE)
    try:
        signature = bytes.fromhex(signature_raw.removeprefix("0x"))
    except ValueError:
        raise MalformedAuth(f"{HEADER_EPISTULA_SIGNATURE} is not hex") from None

    # Epistula allows unbound ("broadcast") signatures with an empty Signed-For; a server
    # accepting them could be fed requests that were signed for someone else.
    signed_for = lowered.get(HEADER_EPISTULA_SIGNED_FOR.lower(), "")
    if not signed_for:
        raise WrongReceiver(f"missing {HEADER_EPISTULA_SIGNED_FOR}: this server requires receiver-bound requests")
    if signed_for != receiver_ss58:
        raise WrongReceiver("request was signed for a different receiving hotkey")

    timestamp_ms = int(timestamp_raw)
    now_ms = now_ns / 1e6
    if now_ms - timestamp_ms > max_age * 1000:
        raise StaleRequest(f"timestamp is older than the {max_age:g}s freshness window")
    if timestamp_ms - now_ms > allowed_skew * 1000:
        raise FutureRequest(f"timestamp is more than {allowed_skew:g}s in the future")

    message = epistula_message(body, uuid_raw, timestamp_raw, signed_for)
    try:
        valid = sp_verify(message, signature, sender, CRYPTO_SR25519)
    except ValueError:
        # Undecodable ss58 address or wrong-length signature.
        raise MalformedAuth("invalid Epistula-Signed-By address or signature encoding") from None
    if not valid:
        raise BadSignature("signature does not verify against the claimed hotkey")

    caller = Caller(hotkey_ss58=sender, scheme="epistula", request_id=request_uuid, signed_at=timestamp_ms / 1000)
    # Prefixed like btauth nonces in the store, so the two kinds never collide.
    return Checked(caller, lambda store: store.claim(sender, f"epistula:{request_uuid}"))


def _now_ns(now: float | None) -> int:
    return time.time_ns() if now is None else round(now * 1e9)


def check_nonce_window(nonce_store: NonceStore, max_age: float, allowed_skew: float) -> None:
    """ValueError unless the store remembers nonces for the whole freshness window (with
    `check_request`, call it once where the server is set up)."""
    # A store that forgets sooner than the freshness window closes would let a replay in
    # through the gap. This is a configuration error, not the caller's fault.
    if max_age <= 0 or allowed_skew < 0:
        raise ValueError("max_age must be positive and allowed_skew non-negative")
    if nonce_store.retention < max_age + allowed_skew:
        raise ValueError(
            f"nonce store retains entries for {nonce_store.retention:g}s but the freshness window "
            f"is {max_age + allowed_skew:g}s; use retention >= max_age + allowed_skew"
        )


def verify_request(
    headers: Mapping[str, str],
    body: bytes,
    *,
    method: str,
    path: str,
    receiver_ss58: str,
    nonce_store: NonceStore,
    policy: SenderPolicy,
    max_age: float = DEFAULT_MAX_AGE,
    allowed_skew: float = DEFAULT_ALLOWED_SKEW,
    schemes: Iterable[Scheme] = SCHEMES,
    now: float | None = None,
) -> Caller:
    """Authenticate a received request and apply the sender policy.

    `body` is the raw received bytes, before any parsing; `path` is the request target as
    received, query string included. `now` (unix seconds) is for tests. Returns the
    `Caller`; raises an `AuthError` subclass whose `status_code` is 401 (authentication)
    or 403 (policy). `ValueError` means the server is misconfigured.
    """
    check_nonce_window(nonce_store, max_age, allowed_skew)
    checked = check_request(
        headers,
        body,
        method=method,
        path=path,
        receiver_ss58=receiver_ss58,
        policy=policy,
        max_age=max_age,
        allowed_skew=allowed_skew,
        schemes=schemes,
        now=now,
    )
    return checked.claim(nonce_store)


def check_request(
    headers: Mapping[str, str],
    body: bytes,
    *,
    method: str,
    path: str,
    receiver_ss58: str,
    policy: SenderPolicy,
    max_age: float = DEFAULT_MAX_AGE,
    allowed_skew: float = DEFAULT_ALLOWED_SKEW,
    schemes: Iterable[Scheme] = SCHEMES,
    now: float | None = None,
) -> Checked:
    """Everything `verify_request` checks but the replay: claim the result (`Checked.claim`) in a
    nonce store whose retention covers `max_age + allowed_skew` before acting on the request."""
    scheme = detect_scheme(headers)
    if scheme not in set(schemes):
        raise MalformedAuth(f"{scheme} signatures are not accepted here")
    now_ns = _now_ns(now)
    if scheme == "btauth":
        checked = _check_btauth(
            headers,
            body,
            method=method,
            path=path,
            receiver_ss58=receiver_ss58,
            max_age=max_age,
            allowed_skew=allowed_skew,
            now_ns=now_ns,
        )
    else:
        checked = _check_epistula(
            headers,
            body,
            receiver_ss58=receiver_ss58,
            max_age=max_age,
            allowed_skew=allowed_skew,
            now_ns=now_ns,
        )
    policy.check(checked.caller.hotkey_ss58)
    return checked
