"""Signing keys: a hotkey loaded from a bittensor wallet on disk or from a dev URI.

Services sign with their hotkey only; coldkeys never leave the operator's machine. A
`Signer` satisfies `bittensor.Signer`, so it can be handed to `bittensor.http_auth.sign`
or anything else in the SDK that signs.
"""

from __future__ import annotations

from pathlib import Path

from bittensor.keyfiles import Keyfile, KeyfileError, Keypair, WrongPasswordError, resolve_key_password
from bittensor.wallet import DEFAULT_WALLET_PATH, Wallet

__all__ = [
    "DEFAULT_WALLET_PATH",
    "InvalidKeyUriError",
    "Signer",
    "SigningKeyError",
    "WalletExistsError",
    "WalletLockedError",
    "WalletNotFoundError",
    "create_dev_wallet",
    "load_signer",
    "signer_from_uri",
    "signer_from_wallet",
]


class SigningKeyError(Exception):
    """A signing key could not be loaded or created. The message says what to fix."""


class WalletNotFoundError(SigningKeyError):
    """The wallet directory or its hotkey file does not exist."""


class WalletLockedError(SigningKeyError):
    """The hotkey file is encrypted and no (or a wrong) password was supplied."""


class WalletExistsError(SigningKeyError):
    """Refused to overwrite an existing wallet key."""


class InvalidKeyUriError(SigningKeyError):
    """A secret URI (`//Alice`, a mnemonic, a 0x seed) could not be parsed."""


class Signer:
    """A hotkey that signs. Exposes the public parts and `sign`, never the secret.

    Structurally a `bittensor.Signer` (ss58_address, public_key, crypto_type, sign).
    """

    def __init__(self, keypair: Keypair, *, source: str) -> None:
        self._keypair = keypair
        # Where the key came from, for logs and errors. Never the URI itself: a URI
        # with a mnemonic is the secret.
        self.source = source

    @property
    def ss58_address(self) -> str:
        return str(self._keypair.ss58_address)

    @property
    def public_key(self) -> bytes:
        return bytes(self._keypair.public_key)

    @property
    def crypto_type(self) -> int:
        return int(self._keypair.crypto_type)

    def sign(self, payload: bytes) -> bytes:
        return bytes(self._keypair.sign(payload))

    def verify(self, payload: bytes, signature: bytes) -> bool:
        return bool(self._keypair.verify(payload, signature))

    def __repr__(self) -> str:
        return f"Signer({self.ss58_address}, source={self.source!r})"


def signer_from_uri(uri: str) -> Signer:
    """A signer from a secret URI: `//Alice`, `//Alice//stash`, `<mnemonic>//path`, `0x<seed>`.

    Dev URIs (`//Alice` ...) derive from a publicly known phrase: use them on local
    chains only.
    """
    # The empty URI derives the well-known dev root key; it is almost always a missing
    # setting rather than a deliberate choice.
    if not uri.strip():
        raise InvalidKeyUriError("empty key URI; expected something like '//Alice'")
    try:
        keypair = Keypair.create_from_uri(uri)
    except ValueError as error:
        # The binding's message names the parse failure but does not echo the URI.
        raise InvalidKeyUriError(f"cannot derive a key from the given URI: {error}") from None
    source = f"uri:{uri}" if uri.startswith("//") else "uri:<secret>"
    return Signer(keypair, source=source)


def signer_from_wallet(
    name: str,
    hotkey: str = "default",
    path: str | Path = DEFAULT_WALLET_PATH,
    *,
    password: str | None = None,
) -> Signer:
    """The hotkey of wallet `name` under `path` (default `~/.bittensor/wallets`).

    An encrypted hotkey needs `password`, or the per-key `BT_PW_...` environment variable
    in the encoded form bittensor's `Keyfile.save_password_to_env` writes; this never
    prompts, since services run unattended. Unlocking takes several seconds (bittensor's
    key derivation is deliberately slow): load the signer once at startup.
    """
    wallet_dir = Path(path).expanduser() / name
    wallet = Wallet(name=name, hotkey=hotkey, path=str(Path(path).expanduser()))
    keyfile: Keyfile = wallet.hotkey_file
    if not wallet_dir.is_dir():
        raise WalletNotFoundError(
            f"no wallet named {name!r} under {wallet_dir.parent} "
            "(create one with `btcli wallet create` or use a dev URI such as //Alice)"
        )
    if not keyfile.exists_on_device():
        raise WalletNotFoundError(f"wallet {name!r} has no hotkey {hotkey!r} (looked for {keyfile.path})")
    if not keyfile.is_readable():
        raise SigningKeyError(f"hotkey file {keyfile.path} is not readable by this user")

    if keyfile.is_encrypted():
        try:
            password = resolve_key_password(password, env_var_name=keyfile.env_var_name(), allow_prompt=False)
        except KeyfileError as error:
            raise WalletLockedError(f"cannot read {keyfile.env_var_name()}: {error}") from None
        if password is None:
            raise WalletLockedError(
                f"hotkey {keyfile.path} is encrypted; pass a password or set {keyfile.env_var_name()}"
            )
    try:
        keypair = keyfile.get_keypair(password)
    except WrongPasswordError:
        raise WalletLockedError(f"wrong password for hotkey {keyfile.path}") from None
    except (KeyfileError, ValueError) as error:
        raise SigningKeyError(f"cannot read hotkey {keyfile.path}: {error}") from None
    return Signer(keypair, source=f"wallet:{name}/{hotkey}")


def load_signer(
    *,
    uri: str | None = None,
    wallet_name: str | None = None,
    hotkey: str = "default",
    wallet_path: str | Path = DEFAULT_WALLET_PATH,
    password: str | None = None,
) -> Signer:
    """One entry point for settings: exactly one of `uri` or `wallet_name`."""
    if (uri is None) == (wallet_name is None):
        raise SigningKeyError("configure exactly one signing key: a key URI or a wallet name")
    if uri is not None:
        return signer_from_uri(uri)
    assert wallet_name is not None
    return signer_from_wallet(wallet_name, hotkey, wallet_path, password=password)


def create_dev_wallet(
    name: str,
    hotkey: str = "default",
    path: str | Path = DEFAULT_WALLET_PATH,
    *,
    hotkey_uri: str | None = None,
    coldkey_uri: str | None = None,
    overwrite: bool = False,
) -> Signer:
    """Write an UNENCRYPTED wallet (coldkey and hotkey) for local development.

    Keys come from the given URIs (deterministic, e.g. `//Alice`) or fresh mnemonics
    that are not shown anywhere. A local chain needs the coldkey to register the hotkey,
    which is why both are written. Adding a hotkey to an existing wallet keeps its
    coldkey. Never use this for keys that hold value.
    """
    root = str(Path(path).expanduser())
    wallet = Wallet(name=name, hotkey=hotkey, path=root)
    # Checked here rather than left to bittensor, which asks on a TTY instead of refusing.
    if wallet.hotkey_file.exists_on_device() and not overwrite:
        raise WalletExistsError(f"{wallet.hotkey_file.path} exists; pass overwrite=True to replace it")
    keep_coldkey = wallet.coldkey_file.exists_on_device() and not overwrite
    if keep_coldkey and coldkey_uri is not None:
        wanted = signer_from_uri(coldkey_uri).ss58_address
        if not wallet.coldkeypub_file.exists_on_device() or wallet.coldkeypub.ss58_address != wanted:
            raise WalletExistsError(
                f"wallet {name!r} already has a different coldkey; pass overwrite=True to replace it"
            )

    if not keep_coldkey:
        coldkey = _keypair_from(coldkey_uri)
        wallet.coldkey_file.set_keypair(coldkey, encrypt=False, overwrite=overwrite)
        wallet.regenerate_coldkeypub(
            ss58_address=coldkey.ss58_address, overwrite=overwrite, crypto_type=coldkey.crypto_type
        )
    hot = _keypair_from(hotkey_uri)
    wallet.hotkey_file.set_keypair(hot, encrypt=False, overwrite=overwrite)
    wallet.regenerate_hotkeypub(ss58_address=hot.ss58_address, overwrite=overwrite, crypto_type=hot.crypto_type)
    return Signer(hot, source=f"wallet:{name}/{hotkey}")


def _keypair_from(uri: str | None) -> Keypair:
    if uri is None:
        return Keypair.create_from_mnemonic(Keypair.generate_mnemonic(12))
    return signer_from_uri(uri)._keypair
