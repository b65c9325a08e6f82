from miner_kit import make_miner, server  # noqa: F401  (fixtures)
