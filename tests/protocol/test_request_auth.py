"""Signed requests, both schemes: what gets in, and the precise reason for what does not."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import pytest
from bittensor import http_auth
from bittensor.keyfiles import Keypair

from dippy_studio.protocol import (
    DEFAULT_ALLOWED_SKEW,
    DEFAULT_MAX_AGE,
    AuthError,
    BadSignature,
    Caller,
    FutureRequest,
    MalformedAuth,
    MemoryNonceStore,
    MissingAuth,
    ReplayedRequest,
    Scheme,
    SenderNotAllowed,
    SenderPolicy,
    Signer,
    StaleRequest,
    WrongReceiver,
    detect_scheme,
    sign_request,
    verify_request,
)
from dippy_studio.protocol.auth import WrongTarget, check_headers, check_nonce_window, check_request

T0 = 1_700_000_000.0
BODY = b'{"prompt": "a cat in a hat", "seed": 7}'
METHOD, PATH = "POST", "/inference?priority=high"
SCHEMES: list[Scheme] = ["btauth", "epistula"]

SIGNATURE_HEADER = {"btauth": "X-Bittensor-Signature", "epistula": "Epistula-Request-Signature"}
SENDER_HEADER = {"btauth": "X-Bittensor-Hotkey", "epistula": "Epistula-Signed-By"}
RECEIVER_HEADER = {"btauth": "X-Bittensor-Receiver", "epistula": "Epistula-Signed-For"}


def verify(headers: dict[str, str], receiver: Signer, store: Any, **overrides: Any) -> Caller:
    kwargs: dict[str, Any] = dict(
        method=METHOD,
        path=PATH,
        receiver_ss58=receiver.ss58_address,
        nonce_store=store,
        policy=SenderPolicy.open(),
        now=T0,
    )
    kwargs.update(overrides)
    body = kwargs.pop("body", BODY)
    return verify_request(headers, body, **kwargs)


def flip_last_hex_digit(value: str) -> str:
    return value[:-1] + ("0" if value[-1] != "0" else "1")


# --- accepted ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_valid_request_returns_the_caller(scheme: Scheme, alice: Signer, bob: Signer, store) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, scheme, now=T0)
    assert detect_scheme(headers) == scheme

    caller = verify(headers, bob, store)

    assert caller.hotkey_ss58 == alice.ss58_address
    assert caller.scheme == scheme
    assert caller.signed_at == pytest.approx(T0, abs=1e-3)
    assert caller.request_id


@pytest.mark.parametrize("scheme", SCHEMES)
def test_header_names_are_case_insensitive(scheme: Scheme, alice: Signer, bob: Signer, store) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, scheme, now=T0)
    lowered = {key.lower(): value for key, value in headers.items()}
    assert verify(lowered, bob, store).hotkey_ss58 == alice.ss58_address


@pytest.mark.parametrize("scheme", SCHEMES)
def test_signatures_within_the_window_are_accepted(scheme: Scheme, alice: Signer, bob: Signer) -> None:
    early = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, scheme, now=T0 - DEFAULT_MAX_AGE + 0.5)
    late = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, scheme, now=T0 + DEFAULT_ALLOWED_SKEW - 0.5)
    store = MemoryNonceStore()
    verify(early, bob, store)
    verify(late, bob, store)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_requests_signed_back_to_back_are_distinct(scheme: Scheme, alice: Signer, bob: Signer) -> None:
    store = MemoryNonceStore()
    first = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, scheme)
    second = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, scheme)
    # Real clock: both signed now, both accepted, neither mistaken for a replay.
    assert verify(first, bob, store, now=None).request_id != verify(second, bob, store, now=None).request_id


def test_headers_from_bittensor_sign_are_accepted(alice: Signer, bob: Signer, store) -> None:
    # Interop: peers that call bittensor.http_auth directly, with a raw keypair.
    keypair = Keypair.create_from_uri("//Alice")
    headers = http_auth.sign(
        keypair, method=METHOD, path=PATH, body=BODY, receiver_ss58=bob.ss58_address, nonce_ns=int(T0 * 1e9)
    )
    assert verify(headers, bob, store).hotkey_ss58 == alice.ss58_address


def reference_epistula(body: bytes, receiver: Signer, uri: str = "//Dave") -> dict[str, str]:
    """What other subnets' orchestrators send, built by hand from the spec: no request target."""
    keypair = Keypair.create_from_uri(uri)
    timestamp = str(round(T0 * 1000))
    request_uuid = str(uuid.uuid4())
    message = f"{hashlib.sha256(body).hexdigest()}.{request_uuid}.{timestamp}.{receiver.ss58_address}"
    return {
        "Epistula-Version": "2",
        "Epistula-Timestamp": timestamp,
        "Epistula-Uuid": request_uuid,
        "Epistula-Signed-By": keypair.ss58_address,
        "Epistula-Signed-For": receiver.ss58_address,
        "Epistula-Request-Signature": "0x" + bytes(keypair.sign(message.encode())).hex(),
    }


def test_epistula_headers_built_like_the_reference_client_are_accepted(bob: Signer, store) -> None:
    headers = reference_epistula(BODY, bob)
    caller = verify(headers, bob, store)
    assert caller.hotkey_ss58 == Keypair.create_from_uri("//Dave").ss58_address
    assert caller.request_id == headers["Epistula-Uuid"]


# --- rejected: authentication (401) -------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_tampered_body_is_rejected(scheme: Scheme, alice: Signer, bob: Signer, store) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, scheme, now=T0)
    with pytest.raises(BadSignature) as caught:
        verify(headers, bob, store, body=BODY.replace(b"cat", b"dog"))
    assert caught.value.status_code == 401
    assert len(store) == 0  # a forged request must not consume the nonce


@pytest.mark.parametrize("scheme", SCHEMES)
def test_wrong_receiver_is_rejected(scheme: Scheme, alice: Signer, bob: Signer, charlie: Signer, store) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, charlie.ss58_address, scheme, now=T0)
    with pytest.raises(WrongReceiver):
        verify(headers, bob, store)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_unbound_request_is_rejected(scheme: Scheme, alice: Signer, bob: Signer, store) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, scheme, now=T0)
    del headers[RECEIVER_HEADER[scheme]]
    with pytest.raises(WrongReceiver, match="receiver-bound"):
        verify(headers, bob, store)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_redirected_receiver_header_is_rejected(
    scheme: Scheme, alice: Signer, bob: Signer, charlie: Signer, store
) -> None:
    # Signed for Charlie, header rewritten to Bob: the signature covers the receiver.
    headers = sign_request(alice, METHOD, PATH, BODY, charlie.ss58_address, scheme, now=T0)
    headers[RECEIVER_HEADER[scheme]] = bob.ss58_address
    with pytest.raises(BadSignature):
        verify(headers, bob, store)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_stale_timestamp_is_rejected(scheme: Scheme, alice: Signer, bob: Signer, store) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, scheme, now=T0)
    with pytest.raises(StaleRequest):
        verify(headers, bob, store, now=T0 + DEFAULT_MAX_AGE + 1)
    with pytest.raises(StaleRequest):
        verify(headers, bob, store, now=T0 + 4, max_age=3)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_future_timestamp_is_rejected(scheme: Scheme, alice: Signer, bob: Signer, store) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, scheme, now=T0 + DEFAULT_ALLOWED_SKEW + 1)
    with pytest.raises(FutureRequest):
        verify(headers, bob, store)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_replayed_request_is_rejected(scheme: Scheme, alice: Signer, bob: Signer, store) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, scheme, now=T0)
    verify(headers, bob, store)
    with pytest.raises(ReplayedRequest) as caught:
        verify(headers, bob, store, now=T0 + 1)
    assert caught.value.status_code == 401


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_checked_request_is_recorded_only_when_claimed(scheme: Scheme, alice: Signer, bob: Signer, store) -> None:
    # The orchestrator checks a callback on its event loop and claims its nonce on its database
    # writer thread: checking alone records nothing, and a second claim is a replay.
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, scheme, now=T0)
    checks = dict(method=METHOD, path=PATH, receiver_ss58=bob.ss58_address, policy=SenderPolicy.open(), now=T0)
    first, again = (check_request(headers, BODY, **checks) for _ in range(2))  # type: ignore[arg-type]
    assert first.claim(store).hotkey_ss58 == alice.ss58_address
    with pytest.raises(ReplayedRequest):
        again.claim(store)
    with pytest.raises(BadSignature):
        check_request(headers, BODY + b" ", **checks)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retains entries for 1s"):
        check_nonce_window(MemoryNonceStore(retention=1.0), DEFAULT_MAX_AGE, DEFAULT_ALLOWED_SKEW)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_bad_signature_is_rejected(scheme: Scheme, alice: Signer, bob: Signer, store) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, scheme, now=T0)
    headers[SIGNATURE_HEADER[scheme]] = flip_last_hex_digit(headers[SIGNATURE_HEADER[scheme]])
    with pytest.raises(BadSignature):
        verify(headers, bob, store)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_claiming_another_sender_is_rejected(
    scheme: Scheme, alice: Signer, bob: Signer, charlie: Signer, store
) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, scheme, now=T0)
    headers[SENDER_HEADER[scheme]] = charlie.ss58_address
    with pytest.raises(BadSignature):
        verify(headers, bob, store)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_undecodable_signature_is_malformed(scheme: Scheme, alice: Signer, bob: Signer, store) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, scheme, now=T0)
    headers[SIGNATURE_HEADER[scheme]] = "0xnot-hex"
    with pytest.raises(MalformedAuth):
        verify(headers, bob, store)
    headers[SIGNATURE_HEADER[scheme]] = "0xabcd"  # hex, but not 64 bytes
    with pytest.raises(MalformedAuth):
        verify(headers, bob, store)


BTAUTH_REQUIRED = ["X-Bittensor-Version", "X-Bittensor-Hotkey", "X-Bittensor-Nonce", "X-Bittensor-Signature"]
EPISTULA_REQUIRED = [
    "Epistula-Version",
    "Epistula-Timestamp",
    "Epistula-Uuid",
    "Epistula-Signed-By",
    "Epistula-Request-Signature",
]


@pytest.mark.parametrize(
    ("scheme", "header"),
    [("btauth", name) for name in BTAUTH_REQUIRED] + [("epistula", name) for name in EPISTULA_REQUIRED],
)
def test_missing_header_is_malformed(scheme: Scheme, header: str, alice: Signer, bob: Signer, store) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, scheme, now=T0)
    del headers[header]
    with pytest.raises(MalformedAuth):
        verify(headers, bob, store)


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Epistula-Version", "1"),
        ("Epistula-Timestamp", "+1700000000000"),
        ("Epistula-Timestamp", "1.7e12"),
        ("Epistula-Uuid", "not-a-uuid"),
        ("Epistula-Signed-By", "5notanaddress"),
    ],
)
def test_unparseable_epistula_header_is_malformed(header: str, value: str, alice: Signer, bob: Signer, store) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, "epistula", now=T0)
    headers[header] = value
    with pytest.raises(MalformedAuth):
        verify(headers, bob, store)


def test_bad_btauth_nonce_is_malformed(alice: Signer, bob: Signer, store) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, "btauth", now=T0)
    headers["X-Bittensor-Nonce"] = "yesterday"
    with pytest.raises(MalformedAuth):
        verify(headers, bob, store)


def test_unsigned_request_is_missing_auth(bob: Signer, store) -> None:
    with pytest.raises(MissingAuth) as caught:
        verify({"Content-Type": "application/json"}, bob, store)
    assert caught.value.status_code == 401
    assert isinstance(caught.value, AuthError)


def test_mixing_schemes_is_malformed(alice: Signer, bob: Signer, store) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, "btauth", now=T0)
    headers.update(sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, "epistula", now=T0))
    with pytest.raises(MalformedAuth, match="both"):
        verify(headers, bob, store)


def test_a_refused_scheme_is_malformed(alice: Signer, bob: Signer, store) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, "epistula", now=T0)
    with pytest.raises(MalformedAuth, match="not accepted"):
        verify(headers, bob, store, schemes=["btauth"])


def test_btauth_binds_method_and_path(alice: Signer, bob: Signer, store) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, "btauth", now=T0)
    with pytest.raises(BadSignature):
        verify(headers, bob, store, path="/inference?priority=low")
    with pytest.raises(BadSignature):
        verify(headers, bob, store, method="PUT")


def test_our_epistula_signatures_bind_method_and_path(alice: Signer, bob: Signer, store) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, "epistula", now=T0)
    assert headers["Epistula-Request-Target"] == f"{METHOD} {PATH}"
    with pytest.raises(WrongTarget, match="signed for 'POST /inference"):
        verify(headers, bob, store, path="/elsewhere")
    with pytest.raises(WrongTarget):
        verify(headers, bob, store, method="PUT")
    # Rewriting the target to match, or dropping it, breaks the signature: the target is signed.
    with pytest.raises(BadSignature):
        verify({**headers, "Epistula-Request-Target": "PUT /elsewhere"}, bob, store, path="/elsewhere", method="PUT")
    unbound = {k: v for k, v in headers.items() if k != "Epistula-Request-Target"}
    with pytest.raises(BadSignature):
        verify(unbound, bob, store, path="/elsewhere")
    assert len(store) == 0
    assert verify(headers, bob, store).hotkey_ss58 == alice.ss58_address


def test_a_standard_epistula_signature_cannot_authorise_a_bodiless_action(alice: Signer, bob: Signer, store) -> None:
    # Headers from a body-less GET, aimed at a body-less POST (a cancel): nothing signed says which.
    headers = reference_epistula(b"", bob, "//Alice")
    with pytest.raises(WrongTarget, match="without a body") as caught:
        verify(headers, bob, store, body=b"", method="POST", path="/v1/jobs/x/cancel")
    assert caught.value.status_code == 401 and len(store) == 0
    with pytest.raises(WrongTarget):
        verify(headers, bob, store, body=b"", method="DELETE", path="/v1/jobs/x")
    # Reads stay open to standard senders; so do requests whose signed body says what they are.
    assert verify(headers, bob, store, body=b"", method="GET", path="/v1/capacity")
    assert verify(reference_epistula(BODY, bob, "//Alice"), bob, store).hotkey_ss58 == alice.ss58_address


def test_headers_are_checked_before_the_body(alice: Signer, bob: Signer, charlie: Signer, store) -> None:
    # A server taking large bodies refuses on the headers alone, then verifies against the digest.
    checks = dict(method=METHOD, path=PATH, receiver_ss58=bob.ss58_address, now=T0)
    for scheme in SCHEMES:
        with pytest.raises(StaleRequest):
            check_headers(sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, scheme, now=T0 - 60), **checks)
        with pytest.raises(WrongReceiver):
            check_headers(sign_request(alice, METHOD, PATH, BODY, charlie.ss58_address, scheme, now=T0), **checks)
        signed = check_headers(sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, scheme, now=T0), **checks)
        assert signed.sender == alice.ss58_address
        with pytest.raises(BadSignature):
            signed.check_body(hashlib.sha256(BODY + b"!").hexdigest(), SenderPolicy.open())
        assert signed.check_body(hashlib.sha256(BODY).hexdigest(), SenderPolicy.open()).claim(store)


# --- rejected: policy (403), and what it leaves behind --------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_policy_refusal_is_403_and_does_not_burn_the_nonce(
    scheme: Scheme, alice: Signer, bob: Signer, charlie: Signer, store
) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, scheme, now=T0)
    with pytest.raises(SenderNotAllowed) as caught:
        verify(headers, bob, store, policy=SenderPolicy.allow_list([charlie.ss58_address]))
    assert caught.value.status_code == 403
    assert len(store) == 0
    # Once the sender is let in, the very same request goes through.
    assert verify(headers, bob, store, policy=SenderPolicy.allow_list([alice.ss58_address]))


# --- configuration errors and signing -------------------------------------------------------


def test_store_retention_shorter_than_the_window_is_a_configuration_error(alice: Signer, bob: Signer) -> None:
    headers = sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, "epistula", now=T0)
    with pytest.raises(ValueError, match="retention"):
        verify(headers, bob, MemoryNonceStore(retention=5), max_age=10, allowed_skew=2)


def test_unknown_scheme_cannot_sign(alice: Signer, bob: Signer) -> None:
    with pytest.raises(ValueError, match="scheme"):
        sign_request(alice, METHOD, PATH, BODY, bob.ss58_address, "jwt")  # type: ignore[arg-type]


def test_epistula_needs_an_sr25519_key(bob: Signer) -> None:
    ed25519 = Signer(Keypair.create_from_mnemonic(Keypair.generate_mnemonic(12), 0), source="test")
    with pytest.raises(ValueError, match="sr25519"):
        sign_request(ed25519, METHOD, PATH, BODY, bob.ss58_address, "epistula")
    # btauth names the scheme in a header, so ed25519 works there.
    headers = sign_request(ed25519, METHOD, PATH, BODY, bob.ss58_address, "btauth", now=T0)
    assert verify(headers, bob, MemoryNonceStore()).hotkey_ss58 == ed25519.ss58_address
