"""`BittensorChain`: the `Chain` protocol over the bittensor v11 SDK (finney, test, a local node).

The SDK client is injected (`client=`): by default a blocking `bittensor.SyncClient(network)`,
which connects lazily, so building a `BittensorChain` costs nothing until the first read.
Tests pass a fake with the same surface. SDK calls used (names checked in bittensor 11.3.0):

- `client.block`                                   current block
- `client.at()` -> snapshot; `snapshot.query(bittensor.storage.SubtensorModule.<Item>, [netuid])`
  for `Tempo`, `WeightsSetRateLimit`, `MaxWeightsLimit`, `MinAllowedWeights`,
  `WeightsVersionKey`, `MaxAllowedValidators`, `ImmunityPeriod`, `MaxAllowedUids`,
  `CommitRevealWeightsEnabled`, and `StakeThreshold` (no netuid; rao), all at one block
- `client.subnets.metagraph(netuid)` -> `bittensor.Metagraph` (neurons with stake, permits,
  incentive, dividends, emission and each hotkey's commitment)
- `client.neurons.uid(hotkey_ss58, netuid)`; `snapshot.query(SubtensorModule.Keys, [netuid, uid])`
- `client.identity.commitment(netuid, hotkey_ss58)` -> `bittensor.Commitment` or None
- `client.weights.weights(netuid)` -> `{validator_uid: {miner_uid: fraction}}`
- `client.execute(bittensor.BurnedRegister(netuid=, hotkey_ss58=), wallet)` (coldkey signs)
- `client.execute(bittensor.AddStake(hotkey_ss58=, netuid=, amount_tao=), wallet)` (coldkey;
  on the real chain the amount is TAO, swapped into the subnet's alpha)
- `client.execute(bittensor.SetWeights(netuid=, uids=, weights=, version_key=), wallet)`
  (hotkey; the SDK preflights registration and the rate limit and picks plain or
  commit-reveal submission)
- `client.submit_call(bittensor.calls.Commitments.set_commitment(netuid=, info=), wallet,
  signer="hotkey")` (no intent wraps commitments in v11)

Weights are conformed here first (`conformance.conform`), so the u16 values the SDK
submits are the ones `set_weights` returns and they pass the chain's max-weight check
(the SDK's own clip can miss it by a rounding unit; see `conformance`). Passed to
`SetWeights` as floats, integers that already fit go through its clip and quantisation
unchanged.

Manual check against testnet (not automated: it needs a funded testnet coldkey, a
subnet N you may register on, and network access). `btcli` is the v11 SDK's own CLI.

    btcli --wallet dippy-test wallet create                 # coldkey + hotkey "default"
    # fund the coldkey from the testnet faucet; HK = the hotkey's ss58 address
    dippy-studio chain register --network test --netuid N --wallet dippy-test
        # -> "registered HK as uid U"; `btcli -n test subnets metagraph --netuid N` lists HK at U
    dippy-studio chain commit-endpoint HK https://miner.example.org:8000 \\
        --network test --netuid N --wallet dippy-test
        # the one call no SDK intent wraps: check the chain took the Raw field as text
    btcli -n test query commitment --netuid N --hotkey HK  # -> https://miner.example.org:8000
    dippy-studio chain metagraph --network test --netuid N --json   # HK's "commitment" is the URL
    dippy-studio chain stake HK 1.0 --network test --netuid N --wallet dippy-test
    python - <<'PY'
    import bittensor as bt
    from dippy_studio.chain import BittensorChain
    wallet = bt.Wallet("dippy-test")
    chain = BittensorChain("test", N, wallet)
    print(chain.hyperparameters())                 # compare: btcli -n test subnets hyperparameters --netuid N
    print(chain.set_weights(wallet.hotkeypub.ss58_address, [0, 1], [0.7, 0.3]))
    PY
        # without a validator permit: NoValidatorPermit (or NotEnoughStakeToSetWeights);
        # run it twice within weights_rate_limit blocks: RateLimited with blocks_left;
        # with a permit, `dippy-studio chain weights --network test --netuid N` shows the row
        # (on commit-reveal subnets only after the reveal round).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import dippy_studio.chain.conformance as conformance
from dippy_studio.chain.base import (
    MAX_COMMITMENT_BYTES,
    AlreadyRegistered,
    ChainError,
    ChainUnavailable,
    Commitment,
    Hyperparameters,
    InvalidCommitment,
    InvalidWeights,
    Metagraph,
    Neuron,
    NotRegistered,
    NoValidatorPermit,
    RateLimited,
    VersionKeyTooLow,
)

__all__ = ["BittensorChain"]

RAO_PER_UNIT = 1_000_000_000

# Chain error names (subtensor pallet errors) that map onto our precise exceptions.
_RATE_LIMITED = {"SettingWeightsTooFast", "CommittingWeightsTooFast", "TooSoon"}
_NO_PERMIT = {"NeuronNoValidatorPermit", "NotEnoughStakeToSetWeights"}
_VERSION = {"IncorrectWeightVersionKey"}
_INVALID_WEIGHTS = {
    "MaxWeightExceeded",
    "WeightVecLengthIsLow",
    "WeightVecNotEqualSize",
    "UidVecContainInvalidOne",
    "UidsLengthExceedUidsInSubNet",
    "DuplicateUids",
}


class BittensorChain:
    """A subnet on a real chain. `network` is a name (`finney`, `test`, `local`) or a
    `ws://` / `wss://` endpoint; `wallet` (a `bittensor.Wallet`) signs writes: its
    coldkey registers and stakes, its hotkey commits and sets weights."""

    def __init__(self, network: str, netuid: int, wallet: Any = None, *, client: Any = None):
        self.network = network
        self._netuid = netuid
        self.wallet = wallet
        self._client = client

    def __repr__(self) -> str:
        return f"BittensorChain(network={self.network!r}, netuid={self._netuid})"

    @property
    def netuid(self) -> int:
        return self._netuid

    @property
    def client(self) -> Any:
        if self._client is None:
            import bittensor

            self._client = bittensor.SyncClient(self.network)
        return self._client

    # Reads ------------------------------------------------------------------------

    def block(self) -> int:
        with self._sdk("read the block number"):
            return int(self.client.block)

    def hyperparameters(self) -> Hyperparameters:
        from bittensor import storage

        sm = storage.SubtensorModule
        with self._sdk("read hyperparameters"):
            snapshot = self.client.at()
            tempo = snapshot.query(sm.Tempo, [self._netuid])
            if tempo is None:
                raise ChainError(f"netuid {self._netuid} does not exist on {self.network}")

            def read(item: Any, default: int) -> int:
                value = snapshot.query(item, [self._netuid])
                return default if value is None else int(value)

            threshold = snapshot.query(sm.StakeThreshold, [])
            return Hyperparameters(
                netuid=self._netuid,
                tempo=int(tempo),
                weights_rate_limit=read(sm.WeightsSetRateLimit, 0),
                max_weight_limit=read(sm.MaxWeightsLimit, conformance.U16_MAX) or conformance.U16_MAX,
                min_allowed_weights=read(sm.MinAllowedWeights, 0),
                weights_version=read(sm.WeightsVersionKey, 0),
                max_validators=read(sm.MaxAllowedValidators, 64),
                min_validator_stake=int(threshold or 0) / RAO_PER_UNIT,
                immunity_period=read(sm.ImmunityPeriod, 0),
                max_allowed_uids=read(sm.MaxAllowedUids, 256) or 1,
                commit_reveal_enabled=bool(snapshot.query(sm.CommitRevealWeightsEnabled, [self._netuid])),
            )

    def metagraph(self) -> Metagraph:
        with self._sdk("read the metagraph"):
            graph = self.client.subnets.metagraph(self._netuid)
        if graph is None:
            raise ChainError(f"netuid {self._netuid} does not exist on {self.network}")
        neurons = tuple(
            Neuron(
                uid=int(n.uid),
                hotkey=n.hotkey,
                coldkey=n.coldkey,
                stake=float(n.total_stake.amount),
                validator_permit=bool(n.validator_permit),
                registered_at=int(n.block_at_registration),
                last_update=int(n.last_update) or None,
                consensus=float(n.consensus),
                incentive=float(n.incentive),
                dividends=float(n.dividends),
                emission=float(n.emission.amount),
            )
            for n in graph.neurons
        )
        commitments = {}
        for n in graph.neurons:
            value = n.commitment.value if n.commitment is not None else None
            if value:
                commitments[int(n.uid)] = Commitment(
                    hotkey=n.hotkey, uid=int(n.uid), data=value, block=int(n.commitment.block)
                )
        return Metagraph(netuid=self._netuid, block=int(graph.block), neurons=neurons, commitments=commitments)

    def get_commitment(self, who: int | str) -> Commitment | None:
        from bittensor import storage

        with self._sdk("read a commitment"):
            if isinstance(who, int):
                hotkey = self.client.at().query(storage.SubtensorModule.Keys, [self._netuid, who])
                if not hotkey:
                    return None
                hotkey = str(hotkey)
            else:
                hotkey = who
            found = self.client.identity.commitment(self._netuid, hotkey)
            if found is None or not found.data:
                return None
            uid = self.client.neurons.uid(hotkey, self._netuid)
        return Commitment(hotkey=hotkey, uid=None if uid is None else int(uid), data=found.data, block=found.block)

    def weights(self) -> dict[int, dict[int, float]]:
        with self._sdk("read weights"):
            rows = self.client.weights.weights(self._netuid)
        return {int(v): {int(m): float(w) for m, w in row.items()} for v, row in rows.items()}

    # Writes -----------------------------------------------------------------------

    def register(self, hotkey: str, coldkey: str) -> int:
        import bittensor

        self._require_wallet_key("coldkey", coldkey)
        with self._sdk("register"):
            existing = self.client.neurons.uid(hotkey, self._netuid)
            if existing is not None:
                raise AlreadyRegistered(hotkey, int(existing))
            result = self.client.execute(bittensor.BurnedRegister(netuid=self._netuid, hotkey_ss58=hotkey), self.wallet)
            result.raise_for_failure()
            uid = self.client.neurons.uid(hotkey, self._netuid)
        if uid is None:
            raise ChainError(f"registration of {hotkey} was included but it has no uid on netuid {self._netuid} yet")
        return int(uid)

    def add_stake(self, hotkey: str, amount: float) -> None:
        import bittensor

        if not amount > 0:
            raise ValueError(f"stake amount must be positive, got {amount}")
        self._require_wallet()
        with self._sdk("add stake"):
            intent = bittensor.AddStake(hotkey_ss58=hotkey, netuid=self._netuid, amount_tao=amount)
            self.client.execute(intent, self.wallet).raise_for_failure()

    def commit(self, hotkey: str, data: str) -> None:
        from bittensor import calls

        raw = data.encode("utf-8")
        if not raw:
            raise InvalidCommitment("commitment is empty")
        if len(raw) > MAX_COMMITMENT_BYTES:
            raise InvalidCommitment(f"commitment is {len(raw)} bytes; the chain accepts at most {MAX_COMMITMENT_BYTES}")
        self._require_wallet_key("hotkey", hotkey)
        # CommitmentInfo.fields is a list of `Data` variants; `RawN` carries N bytes.
        call = calls.Commitments.set_commitment(netuid=self._netuid, info={"fields": [{f"Raw{len(raw)}": raw}]})
        with self._sdk("commit"):
            self.client.submit_call(call, self.wallet, signer="hotkey").raise_for_failure()

    def set_weights(
        self, hotkey: str, uids: Sequence[int], weights: Sequence[float], *, version_key: int = 0
    ) -> dict[int, int]:
        import bittensor

        requested = conformance.pairs(uids, weights)
        self._require_wallet_key("hotkey", hotkey)
        hp = self.hyperparameters()
        if version_key < hp.weights_version:
            raise VersionKeyTooLow(
                f"version_key {version_key} is older than the subnet's weights_version {hp.weights_version}"
            )
        with self._sdk("set weights"):
            uid = self.client.neurons.uid(hotkey, self._netuid)
        if uid is None:
            raise NotRegistered(hotkey)
        values = conformance.conform(
            requested,
            max_weight_limit=hp.max_weight_limit,
            min_allowed_weights=hp.min_allowed_weights,
            self_uid=int(uid),
        )
        intent = bittensor.SetWeights(
            netuid=self._netuid,
            uids=list(values),
            weights=[float(v) for v in values.values()],
            version_key=version_key,
        )
        with self._sdk("set weights", hotkey):
            self.client.execute(intent, self.wallet).raise_for_failure()
        return values

    # Internals --------------------------------------------------------------------

    def _require_wallet(self) -> Any:
        if self.wallet is None:
            raise ChainError("writing to a real chain needs a wallet (--wallet NAME)")
        return self.wallet

    def _wallet_address(self, role: str) -> str:
        import bittensor

        return str(bittensor.public_view(self._require_wallet(), role).ss58_address)

    def _require_wallet_key(self, role: str, address: str) -> None:
        mine = self._wallet_address(role)
        if address != mine:
            raise ChainError(f"the wallet's {role} is {mine}; it cannot sign for {address}")

    @contextmanager
    def _sdk(self, action: str, hotkey: str | None = None) -> Iterator[None]:
        """Translate SDK failures into the chain's exceptions, keeping the SDK error as cause."""
        import bittensor

        try:
            yield
        except bittensor.ChainError as error:
            raise _translate_chain_error(error, action, hotkey) from error
        except (bittensor.RpcConnectionError, bittensor.ConnectionNotReady, OSError, TimeoutError) as error:
            raise ChainUnavailable(f"cannot {action} on {self.network}: {error}") from error
        except bittensor.BittensorError as error:
            raise ChainError(f"cannot {action}: {error}") from error


def _translate_chain_error(error: Any, action: str, hotkey: str | None) -> ChainError:
    from bittensor import ErrorCode

    message = f"cannot {action}: {error.message}"
    name = error.name or ""
    if error.code == ErrorCode.RATE_LIMITED or name in _RATE_LIMITED:
        found = re.search(r"Retry in ~(\d+) block", error.message)
        # The SDK's preflight says how many blocks remain; an on-chain refusal does not.
        return RateLimited(message, blocks_left=int(found.group(1)) if found else 1)
    if error.code == ErrorCode.NOT_REGISTERED:
        return NotRegistered(hotkey or "", message)
    if name in _VERSION:
        return VersionKeyTooLow(message)
    if error.code == ErrorCode.NOT_AUTHORIZED or name in _NO_PERMIT:
        return NoValidatorPermit(message)
    if name in _INVALID_WEIGHTS:
        return InvalidWeights(message)
    return ChainError(message)
