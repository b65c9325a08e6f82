"""Errors the engine raises for bad input; every one carries a message meant for a person."""


class EngineError(Exception):
    """Base class for engine errors a caller can report back to a user."""


class RequestError(EngineError, ValueError):
    """The generation request is invalid for this profile (size, steps, prompt...)."""


class LoraError(EngineError, ValueError):
    """A LoRA file is missing, unreadable, malformed, or does not fit the profile."""


class BadLoraError(LoraError):
    """The LoRA's bytes are unusable: not a safe, well-formed LoRA, or one that does not fit the
    profile. Any engine of the profile would refuse the same file: the fault is whoever chose it."""


class ProfileError(EngineError, ValueError):
    """A model profile cannot be built or loaded as asked (unknown name, missing directory...)."""


class DatasetError(EngineError, ValueError):
    """A training or evaluation dataset is missing, unsafe, malformed, or outside the limits."""


class TrainingError(EngineError, RuntimeError):
    """LoRA training cannot start, cannot resume, or diverged (NaN/Inf loss)."""
