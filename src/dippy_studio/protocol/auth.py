"""Signed requests between miners, the orchestrator and validators.

Two wire schemes, one entry point (`verify_request`):

- btauth/1, the primary scheme, through `bittensor.http_auth`: the signature covers the
  method, the path with its query string, sha256 of the body, a nanosecond nonce, the
  sender and the receiver.
- Epistula v2, which most existing subnet orchestrators speak: the signature covers
  `sha256(body).hexdigest() + "." + uuid + "." + timestamp_ms + "." + signed_for`, which
  leaves out the method and the path. Our senders add `Epistula-Request-Target`
  (`"POST /v1/jobs/x/cancel"`) and sign it too (`"." + target` after the standard
  message), so their signatures are bound like btauth's. A standard, unbound signature is
  refused on a body-less state-changing request (POST, PUT, PATCH, DELETE with no body):
  with nothing else signed, headers captured from one request (a GET) would authorise any
  other. With a body it is accepted: the signed body only makes sense at its own endpoint,
  and the UUID replay check lets it in at most once, wherever it lands.

Verification order, for both: header shape, receiver binding, freshness (all from the
headers: `check_headers`, before the body is read), then signature, sender policy and
replay. The replay store is written last, so neither forged requests nor refused senders
can fill it or burn a legitimate sender's nonces.
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
from bittensor.wallets import CRYPTO_TYPE_NAMES, parse_crypto_type

from dippy_studio.protocol.keys import Signer
from dippy_studio.protocol.nonces import NonceStore

__all__ = [
    "DEFAULT_ALLOWED_SKEW",
    "DEFAULT_MAX_AGE",
    "EMPTY_BODY_SHA256",
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
    "SignedHeaders",
    "StakeLookup",
    "StaleRequest",
    "UnregisteredSender",
    "WrongReceiver",
    "WrongTarget",
    "check_headers",
    "check_nonce_window",
    "check_request",
    "detect_scheme",
    "epistula_message",
    "request_line",
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
# Our extension: the method and request target, signed after the standard message.
HEADER_EPISTULA_TARGET = "Epistula-Request-Target"
EPISTULA_HEADERS = (
    HEADER_EPISTULA_VERSION,
    HEADER_EPISTULA_TIMESTAMP,
    HEADER_EPISTULA_UUID,
    HEADER_EPISTULA_SIGNED_BY,
    HEADER_EPISTULA_SIGNED_FOR,
    HEADER_EPISTULA_SIGNATURE,
    HEADER_EPISTULA_TARGET,
)

EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()
# Methods that change nothing: an unbound Epistula signature may be re-aimed among them (it
# reads the same caller's data), never at an action.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


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


class WrongTarget(AuthError):
    """The signature is for another method or path, or, where that matters, for none."""


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


def epistula_message(body: bytes, uuid: str, timestamp_ms: str, signed_for: str, target: str | None = None) -> bytes:
    """The exact bytes an Epistula v2 signature covers; with `target` ("METHOD /path?query"),
    our bound form."""
    return _epistula_payload(hashlib.sha256(body).hexdigest(), uuid, timestamp_ms, signed_for, target)


def _epistula_payload(body_sha256: str, uuid: str, timestamp_ms: str, signed_for: str, target: str | None) -> bytes:
    message = f"{body_sha256}.{uuid}.{timestamp_ms}.{signed_for}"
    return (message if target is None else f"{message}.{target}").encode()


def request_line(method: str, path: str) -> str:
    """What `Epistula-Request-Target` carries: the method and the request target as sent."""
    return f"{method.upper()} {path}"


def sign_epistula(
    signer: Signer,
    body: bytes,
    receiver_ss58: str,
    *,
    method: str | None = None,
    path: str | None = None,
    now: float | None = None,
    uuid: str | None = None,
) -> dict[str, str]:
    """Epistula v2 headers, bound to `receiver_ss58`, and with `method` and `path` (the request
    target as sent) to that request: give both, unless the receiver only speaks standard Epistula."""
    # Epistula has no crypto-type header; verifiers assume sr25519.
    if signer.crypto_type != CRYPTO_SR25519:
        raise ValueError("Epistula signatures must be sr25519")
    if (method is None) != (path is None):
        raise ValueError("give both method and path, or neither")
    target = request_line(method, path) if method is not None and path is not None else None
    timestamp_ms = str(time.time_ns() // 1_000_000 if now is None else round(now * 1000))
    request_uuid = str(uuid_lib.uuid4()) if uuid is None else uuid
    signature = signer.sign(epistula_message(body, request_uuid, timestamp_ms, receiver_ss58, target))
    headers = {
        HEADER_EPISTULA_VERSION: EPISTULA_VERSION,
        HEADER_EPISTULA_TIMESTAMP: timestamp_ms,
        HEADER_EPISTULA_UUID: request_uuid,
        HEADER_EPISTULA_SIGNED_BY: signer.ss58_address,
        HEADER_EPISTULA_SIGNED_FOR: receiver_ss58,
        HEADER_EPISTULA_SIGNATURE: "0x" + bytes(signature).hex(),
    }
    if target is not None:
        headers[HEADER_EPISTULA_TARGET] = target
    return headers


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
        return sign_epistula(signer, body, receiver_ss58, method=method, path=path, now=now)
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


@dataclass(frozen=True)
class SignedHeaders:
    """A request's signature headers, checked for all that the headers alone show (shape, receiver,
    freshness, and for Epistula the signed target): what a server can refuse before it reads the
    body. `sender` is claimed, not proven, until `check_body` verifies the signature."""

    # The caller as the headers claim it.
    claimed: Caller
    # The bytes the signature must cover, given the body's sha256 (hex); raises an AuthError when
    # no body could make this request acceptable.
    payload: Callable[[str], bytes]
    signature: bytes
    crypto_type: int
    record: Callable[[NonceStore], bool]

    @property
    def sender(self) -> str:
        return self.claimed.hotkey_ss58

    def check_body(self, body_sha256: str, policy: SenderPolicy) -> Checked:
        """Verify the signature over the body (by its sha256, lower-case hex, so that a large body
        can be hashed as it streams in) and apply the sender policy."""
        try:
            valid = sp_verify(self.payload(body_sha256), self.signature, self.sender, self.crypto_type)
        except ValueError:
            # Undecodable ss58 address or wrong-length signature.
            raise MalformedAuth("invalid hotkey address or signature encoding") from None
        if not valid:
            raise BadSignature("signature does not verify against the claimed hotkey")
        policy.check(self.sender)
        return Checked(self.claimed, self.record)


def _btauth_headers(
    lowered: Mapping[str, str],
    *,
    method: str,
    path: str,
    receiver_ss58: str,
    max_age: float,
    allowed_skew: float,
    now_ns: int,
) -> SignedHeaders:
    # The checks of `http_auth.verify`, in its order, but without the body: its payload is built
    # from the body's digest (`http_auth.build_payload`'s lines), so a body need not be in memory.
    if lowered.get(http_auth.HEADER_VERSION.lower()) != http_auth.VERSION:
        raise MalformedAuth(f"missing or unsupported {http_auth.HEADER_VERSION} (expected {http_auth.VERSION!r})")
    sender = lowered.get(http_auth.HEADER_HOTKEY.lower())
    if not sender:
        raise MalformedAuth(f"missing {http_auth.HEADER_HOTKEY}")
    nonce_raw = lowered.get(http_auth.HEADER_NONCE.lower())
    if nonce_raw is None:
        raise MalformedAuth(f"missing {http_auth.HEADER_NONCE}")
    try:
        nonce_ns = int(nonce_raw)
    except ValueError:
        raise MalformedAuth(f"{http_auth.HEADER_NONCE} is not a decimal integer") from None
    try:
        crypto_type = parse_crypto_type(lowered.get(http_auth.HEADER_CRYPTO.lower(), "sr25519"))
    except ValueError:
        raise MalformedAuth(f"unsupported {http_auth.HEADER_CRYPTO}") from None
    # The canonical name, never the header's spelling, goes into the signed bytes.
    crypto_name = CRYPTO_TYPE_NAMES[crypto_type]
    signature = _signature(lowered, http_auth.HEADER_SIGNATURE)

    receiver = lowered.get(http_auth.HEADER_RECEIVER.lower())
    if receiver is None:
        raise WrongReceiver(f"missing {http_auth.HEADER_RECEIVER}: this server requires receiver-bound requests")
    if receiver != receiver_ss58:
        raise WrongReceiver("request was signed for a different receiving hotkey")
    if now_ns - nonce_ns > max_age * 1e9:
        raise StaleRequest(f"nonce is older than the {max_age:g}s freshness window")
    if nonce_ns - now_ns > allowed_skew * 1e9:
        raise FutureRequest(f"nonce is more than {allowed_skew:g}s in the future")

    def payload(body_sha256: str) -> bytes:
        lines = (http_auth.PROTOCOL, crypto_name, method.upper(), path, body_sha256, str(nonce_ns), sender, receiver)
        return "\n".join(lines).encode()

    caller = Caller(hotkey_ss58=sender, scheme="btauth", request_id=str(nonce_ns), signed_at=nonce_ns / 1e9)
    return SignedHeaders(caller, payload, signature, crypto_type, lambda store: store.check_and_store(sender, nonce_ns))


def _epistula_headers(
    lowered: Mapping[str, str],
    *,
    method: str,
    path: str,
    receiver_ss58: str,
    max_age: float,
    allowed_skew: float,
    now_ns: int,
) -> SignedHeaders:
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
    signature = _signature(lowered, HEADER_EPISTULA_SIGNATURE)

    # Epistula allows unbound ("broadcast") signatures with an empty Signed-For; a server
    # accepting them could be fed requests that were signed for someone else.
    signed_for = lowered.get(HEADER_EPISTULA_SIGNED_FOR.lower(), "")
    if not signed_for:
        raise WrongReceiver(f"missing {HEADER_EPISTULA_SIGNED_FOR}: this server requires receiver-bound requests")
    if signed_for != receiver_ss58:
        raise WrongReceiver("request was signed for a different receiving hotkey")

    timestamp_ms = int(timestamp_raw)
    # Compared in integer nanoseconds, as btauth's nonce is: any number of digits passes the
    # digit check, and one past a float's range would overflow a float subtraction.
    timestamp_ns = timestamp_ms * 1_000_000
    if now_ns - timestamp_ns > max_age * 1e9:
        raise StaleRequest(f"timestamp is older than the {max_age:g}s freshness window")
    if timestamp_ns - now_ns > allowed_skew * 1e9:
        raise FutureRequest(f"timestamp is more than {allowed_skew:g}s in the future")

    target = lowered.get(HEADER_EPISTULA_TARGET.lower())
    this_request = request_line(method, path)
    if target is not None and target != this_request:
        raise WrongTarget(f"request was signed for {target!r}, not for {this_request!r}")
    changes_state = method.upper() not in SAFE_METHODS

    def payload(body_sha256: str) -> bytes:
        if target is None and changes_state and body_sha256 == EMPTY_BODY_SHA256:
            raise WrongTarget(
                f"an Epistula signature without {HEADER_EPISTULA_TARGET} does not cover the method or path, "
                f"so it cannot authorise a {method.upper()} without a body: sign with btauth/1, or send "
                f"{HEADER_EPISTULA_TARGET} and sign it"
            )
        return _epistula_payload(body_sha256, uuid_raw, timestamp_raw, signed_for, target)

    caller = Caller(hotkey_ss58=sender, scheme="epistula", request_id=request_uuid, signed_at=timestamp_ms / 1000)
    # Prefixed like btauth nonces in the store, so the two kinds never collide.
    return SignedHeaders(
        caller, payload, signature, CRYPTO_SR25519, lambda store: store.claim(sender, f"epistula:{request_uuid}")
    )


def _signature(lowered: Mapping[str, str], name: str) -> bytes:
    raw = lowered.get(name.lower())
    if not raw:
        raise MalformedAuth(f"missing {name}")
    try:
        return bytes.fromhex(raw.removeprefix("0x"))
    except ValueError:
        raise MalformedAuth(f"{name} is not hex") from None


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


def check_headers(
    headers: Mapping[str, str],
    *,
    method: str,
    path: str,
    receiver_ss58: str,
    max_age: float = DEFAULT_MAX_AGE,
    allowed_skew: float = DEFAULT_ALLOWED_SKEW,
    schemes: Iterable[Scheme] = SCHEMES,
    now: float | None = None,
) -> SignedHeaders:
    """The checks that need no body: which scheme, header shape, receiver, freshness, and for
    Epistula the signed method and path. A server that takes large bodies calls this first and
    reads the body only if it passes (and the claimed sender is one it would hear), then finishes
    with `SignedHeaders.check_body`."""
    scheme = detect_scheme(headers)
    if scheme not in set(schemes):
        raise MalformedAuth(f"{scheme} signatures are not accepted here")
    lowered = {key.lower(): value for key, value in headers.items()}
    read = _btauth_headers if scheme == "btauth" else _epistula_headers
    return read(
        lowered,
        method=method,
        path=path,
        receiver_ss58=receiver_ss58,
        max_age=max_age,
        allowed_skew=allowed_skew,
        now_ns=_now_ns(now),
    )


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
    signed = check_headers(
        headers,
        method=method,
        path=path,
        receiver_ss58=receiver_ss58,
        max_age=max_age,
        allowed_skew=allowed_skew,
        schemes=schemes,
        now=now,
    )
    return signed.check_body(hashlib.sha256(body).hexdigest(), policy)
