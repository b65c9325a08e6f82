"""Signing keys from dev URIs and from wallets on disk."""

from __future__ import annotations

import stat
from pathlib import Path

import bittensor as bt
import pytest
from bittensor import http_auth
from bittensor.keyfiles import Keyfile, WrongPasswordError

from dippy_studio.protocol import (
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

ALICE = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
BOB = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"
MNEMONIC = "bottom drive obey lake curtain smoke basket hold race lonely fit walk"


def test_signer_from_dev_uri() -> None:
    signer = signer_from_uri("//Alice")
    assert signer.ss58_address == ALICE
    assert len(signer.public_key) == 32
    signature = signer.sign(b"hello")
    assert signer.verify(b"hello", signature)
    assert not signer.verify(b"hellO", signature)


def test_mnemonic_uri_is_not_repeated_in_repr() -> None:
    signer = signer_from_uri(f"{MNEMONIC}//Alice")
    assert signer.ss58_address == ALICE
    assert "bottom" not in repr(signer)
    assert "//Alice" in repr(signer_from_uri("//Alice"))


@pytest.mark.parametrize("uri", ["", "   ", "Alice", "//", "0xzz", "not a mnemonic at all"])
def test_bad_uri_is_a_clear_error(uri: str) -> None:
    with pytest.raises(InvalidKeyUriError):
        signer_from_uri(uri)


def test_signer_is_a_bittensor_signer() -> None:
    # So it can go straight into bittensor.http_auth.sign and the rest of the SDK.
    signer = signer_from_uri("//Alice")
    assert isinstance(signer, bt.Signer)
    headers = http_auth.sign(signer, method="GET", path="/", receiver_ss58=BOB)
    assert headers["X-Bittensor-Hotkey"] == ALICE


def test_dev_wallet_round_trip(tmp_path: Path) -> None:
    created = create_dev_wallet("miner", "hot1", tmp_path, hotkey_uri="//Bob", coldkey_uri="//Alice")
    assert created.ss58_address == BOB

    loaded = signer_from_wallet("miner", "hot1", tmp_path)
    assert loaded.ss58_address == BOB
    assert loaded.verify(b"x", created.sign(b"x"))
    assert "miner/hot1" in repr(loaded)

    # The layout bittensor (and btcli) expect, with owner-only key files.
    wallet = bt.Wallet("miner", "hot1", str(tmp_path))
    assert wallet.coldkeypub.ss58_address == ALICE
    assert wallet.hotkeypub.ss58_address == BOB
    assert stat.S_IMODE(Path(wallet.hotkey_file.path).stat().st_mode) == 0o600


def test_dev_wallet_with_fresh_keys(tmp_path: Path) -> None:
    first = create_dev_wallet("a", path=tmp_path)
    second = create_dev_wallet("b", path=tmp_path)
    assert first.ss58_address != second.ss58_address
    assert load_signer(wallet_name="a", wallet_path=tmp_path).ss58_address == first.ss58_address


def test_dev_wallet_refuses_to_overwrite(tmp_path: Path) -> None:
    create_dev_wallet("miner", path=tmp_path, hotkey_uri="//Alice")
    with pytest.raises(WalletExistsError):
        create_dev_wallet("miner", path=tmp_path, hotkey_uri="//Bob")
    assert signer_from_wallet("miner", path=tmp_path).ss58_address == ALICE

    create_dev_wallet("miner", path=tmp_path, hotkey_uri="//Bob", overwrite=True)
    assert signer_from_wallet("miner", path=tmp_path).ss58_address == BOB


def test_more_hotkeys_under_one_dev_coldkey(tmp_path: Path) -> None:
    create_dev_wallet("owner", "m1", tmp_path, hotkey_uri="//Bob", coldkey_uri="//Alice")
    second = create_dev_wallet("owner", "m2", tmp_path, hotkey_uri="//Charlie", coldkey_uri="//Alice")
    assert signer_from_wallet("owner", "m2", tmp_path).ss58_address == second.ss58_address
    assert bt.Wallet("owner", "m2", str(tmp_path)).coldkeypub.ss58_address == ALICE
    create_dev_wallet("owner", "m3", tmp_path)  # no coldkey URI: the existing one is kept
    assert bt.Wallet("owner", "m3", str(tmp_path)).coldkeypub.ss58_address == ALICE
    with pytest.raises(WalletExistsError, match="different coldkey"):
        create_dev_wallet("owner", "m4", tmp_path, coldkey_uri="//Dave")


def test_missing_wallet_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WalletNotFoundError, match="no wallet named 'ghost'"):
        signer_from_wallet("ghost", "default", tmp_path)


def test_missing_hotkey_is_a_clear_error(tmp_path: Path) -> None:
    create_dev_wallet("miner", "default", tmp_path)
    with pytest.raises(WalletNotFoundError, match="no hotkey 'other'"):
        signer_from_wallet("miner", "other", tmp_path)


def _fake_encrypted_hotkey(root: Path, name: str) -> None:
    # Real encryption costs ~5 s per key derivation; the header is what marks a keyfile
    # as encrypted, and these paths fail before anything is decrypted.
    hotkey = root / name / "hotkeys" / "default"
    hotkey.parent.mkdir(parents=True)
    hotkey.write_bytes(b"$NACL" + bytes(64))


def test_encrypted_hotkey_without_a_password_is_locked(tmp_path: Path) -> None:
    _fake_encrypted_hotkey(tmp_path, "locked")
    with pytest.raises(WalletLockedError, match="encrypted; pass a password"):
        signer_from_wallet("locked", path=tmp_path)


def test_unreadable_password_variable_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_encrypted_hotkey(tmp_path, "locked")
    variable = bt.Wallet("locked", "default", str(tmp_path)).hotkey_file.env_var_name()
    monkeypatch.setenv(variable, "%%% not base64 %%%")
    with pytest.raises(WalletLockedError, match=variable):
        signer_from_wallet("locked", path=tmp_path)


def test_wrong_password_is_locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_encrypted_hotkey(tmp_path, "locked")

    def wrong_password(self, password=None):
        raise WrongPasswordError("wrong password for NaCl decryption")

    monkeypatch.setattr(Keyfile, "get_keypair", wrong_password)
    with pytest.raises(WalletLockedError, match="wrong password"):
        signer_from_wallet("locked", path=tmp_path, password="guess")


@pytest.mark.slow
def test_encrypted_hotkey_unlocks_with_its_password(tmp_path: Path) -> None:
    wallet = bt.Wallet("locked", "default", str(tmp_path))
    wallet.create_new_hotkey(hotkey_password="s3cret", suppress=True)
    expected = wallet.hotkeypub.ss58_address
    assert signer_from_wallet("locked", path=tmp_path, password="s3cret").ss58_address == expected


def test_load_signer_needs_exactly_one_source(tmp_path: Path) -> None:
    assert load_signer(uri="//Alice").ss58_address == ALICE
    with pytest.raises(SigningKeyError):
        load_signer()
    with pytest.raises(SigningKeyError):
        load_signer(uri="//Alice", wallet_name="miner", wallet_path=tmp_path)


def test_errors_share_one_base(tmp_path: Path) -> None:
    for error in (InvalidKeyUriError, WalletNotFoundError, WalletLockedError, WalletExistsError):
        assert issubclass(error, SigningKeyError)
    assert isinstance(signer_from_uri("//Alice"), Signer)
