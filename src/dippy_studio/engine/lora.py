"""LoRA files: reading and checking them, and an LRU cache of adapters loaded into a pipeline.

Adapters are applied unfused (PEFT layers beside frozen base weights), so the base weights
never change and switching adapters is a matter of choosing which ones are active.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import FluxPipeline
from diffusers.utils import convert_unet_state_dict_to_peft
from pydantic import BaseModel, ConfigDict, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from dippy_studio.engine.construction import CONSTRUCTION
from dippy_studio.engine.errors import BadLoraError, LoraError
from dippy_studio.protocol.limits import LoraScale

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
MAX_LORA_BYTES = 2 * 1024**3
LORA_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class LoraRef(BaseModel):
    """A LoRA to apply: a file path or an id in the engine's LoRA directory, with a scale."""

    model_config = ConfigDict(frozen=True)

    path: Path | None = None
    id: str | None = None
    scale: LoraScale = 1.0

    @model_validator(mode="after")
    def _one_source(self) -> LoraRef:
        if (self.path is None) == (self.id is None):
            raise ValueError("a LoRA needs exactly one of 'path' or 'id'")
        if self.id is not None and (not LORA_ID.match(self.id) or ".." in self.id):
            raise ValueError(f"invalid LoRA id {self.id!r}: use letters, digits, '_', '-', '.'")
        return self


# Where diffusers/PEFT (`save_lora_weights`) record each adapter's LoraConfig (rank, alpha, ...).
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


@dataclass(frozen=True)
class LoraFile:
    """A LoRA read from disk and checked: its content hash, raw tensors, and the adapter config
    diffusers wrote into its header, if any (`{"transformer.r": 16, "transformer.lora_alpha": 32, ...}`)."""

    path: Path
    sha256: str
    state_dict: dict[str, torch.Tensor]
    adapter_metadata: dict[str, object] | None = None


def read_lora(path: Path, max_bytes: int = MAX_LORA_BYTES) -> LoraFile:
    """Read a .safetensors LoRA, refusing pickles, malformed files and non-finite values."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(f"{path}: pickle checkpoints ({path.suffix}) are refused; use .safetensors")
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise LoraError(f"{path}: not a file")
        if size > max_bytes:
            raise LoraError(f"{path}: {size} bytes is over the {max_bytes}-byte limit for a LoRA")
        data = path.read_bytes()
    except FileNotFoundError:
        raise LoraError(f"LoRA file {path} does not exist") from None
    except PermissionError:
        raise LoraError(f"LoRA file {path} is not readable (permission denied)") from None
    except IsADirectoryError:
        raise LoraError(f"{path}: is a directory, not a LoRA file") from None
    header = _check_safetensors_header(path, data)
    try:
        state_dict = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise BadLoraError(f"{path}: not a valid safetensors file: {exc}") from None
    if not state_dict:
        raise BadLoraError(f"{path}: the file holds no tensors")
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point():
            raise BadLoraError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, expected floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise BadLoraError(f"{path}: tensor {name!r} contains NaN or Inf values")
    sha256 = hashlib.sha256(data).hexdigest()
    return LoraFile(path=path, sha256=sha256, state_dict=state_dict, adapter_metadata=_adapter_metadata(path, header))


def _adapter_metadata(path: Path, header: bytes) -> dict[str, object] | None:
    """The adapter config diffusers keeps in the header's `__metadata__`. It decides the LoRA's
    strength (alpha / rank), so a file that has one and garbles it is refused, not guessed at."""
    try:
        raw = json.loads(header).get("__metadata__", {}).get(ADAPTER_METADATA_KEY)
        if raw is None:
            return None
        metadata = json.loads(raw)
    except (ValueError, AttributeError):
        raise BadLoraError(f"{path}: the '{ADAPTER_METADATA_KEY}' in its header is not valid JSON") from None
    if not isinstance(metadata, dict):
        raise BadLoraError(f"{path}: the '{ADAPTER_METADATA_KEY}' in its header is not a JSON object")
    return metadata


def _check_safetensors_header(path: Path, data: bytes) -> bytes:
    """The JSON header of a safetensors file, or a clear error for anything else."""
    # A safetensors file starts with a little-endian u64 header length and a JSON object.
    # Pickles (torch.save) start with b"\x80" or a zip signature; say so plainly. The header
    # length is checked first: its low byte can be 0x80 (or "PK") in a valid file.
    if len(data) >= 10:
        (header_len,) = struct.unpack("<Q", data[:8])
        if header_len <= len(data) - 8 and data[8:9] == b"{":
            return data[8 : 8 + header_len]
    if data[:2] == b"PK" or data[:1] == b"\x80":
        raise BadLoraError(f"{path}: this is a pickle/torch.save checkpoint; pickle files are refused")
    if len(data) < 10:
        raise BadLoraError(f"{path}: too short to be a safetensors file")
    raise BadLoraError(f"{path}: not a safetensors file (bad header)")


@dataclass(frozen=True)
class LoraFormat:
    """How a model family's LoRA files are read and applied: the diffusers pipeline class whose
    `lora_state_dict` converts other trainers' layouts (Kohya, ai-toolkit...) to diffusers keys,
    and the pipeline components a LoRA may adapt (the first is the denoiser)."""

    label: str
    loader: type
    components: tuple[str, ...]

    def convert(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Diffusers PEFT keys (`component.path.lora_A.weight`), as `load_lora_weights` sees them."""
        converted = self.loader.lora_state_dict(dict(state_dict))
        if isinstance(converted, tuple):
            # UNet families return (state_dict, network_alphas), Kohya files in diffusers' older
            # key layout: renamed to PEFT keys as `load_lora_into_unet` does.
            return dict(convert_unet_state_dict_to_peft(dict(converted[0])))
        return dict(converted)

    def key_pattern(self) -> re.Pattern[str]:
        # Longest names first, so "text_encoder_2" is not read as "text_encoder" plus "_2".
        names = "|".join(re.escape(c) for c in sorted(self.components, key=len, reverse=True))
        return re.compile(rf"^({names})\.(.+)\.(lora_A|lora_B)\.(weight|bias)$")


FLUX_LORA = LoraFormat(label="Flux", loader=FluxPipeline, components=("transformer", "text_encoder"))


def check_lora_fits(pipe: FluxPipeline, lora: LoraFile, lora_format: LoraFormat = FLUX_LORA) -> None:
    """Check that every tensor of the LoRA targets a real Linear layer with matching shapes
    (`lora_fit_problem`); BadLoraError otherwise."""
    problem = lora_fit_problem(pipe, lora.state_dict, lora_format)
    if problem is not None:
        raise BadLoraError(f"{lora.path}: {problem}")


def lora_fit_problem(
    model: FluxPipeline | LayerModels,
    state_dict: Mapping[str, torch.Tensor],
    lora_format: LoraFormat | None = None,
) -> str | None:
    """Why these LoRA tensors do not fit `model` (a pipeline, or a profile's `layer_models`
    without weights), or None: every tensor must target a real Linear layer with matching shapes.
    The format is the family's: given, else the one `LayerModels` carry, else Flux's.

    Kohya / ai-toolkit / XLabs formats are converted by diffusers first, exactly as
    `load_lora_weights` would.
    """
    lora_format = lora_format or getattr(model, "lora_format", None) or FLUX_LORA
    label = lora_format.label
    try:
        converted = lora_format.convert(state_dict)
    except Exception as exc:  # diffusers raises assorted types for unknown layouts
        return f"not a {label} LoRA diffusers can read: {exc}"
    if not converted:
        return f"no LoRA weights for a {label} {lora_format.components[0]} or text encoder"
    problems: list[str] = []
    ranks: dict[str, int] = {}
    pattern = lora_format.key_pattern()
    for key, tensor in converted.items():
        problem = _check_key(model, key, tuple(tensor.shape), ranks, pattern)
        if problem:
            problems.append(problem)
    if not problems:
        return None
    shown = "; ".join(problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return f"does not fit this profile: {shown}{more}"


@dataclass(frozen=True)
class LayerModels:
    """The models a LoRA may adapt, by pipeline component name ("transformer", "unet",
    "text_encoder"...), as `_check_key` looks them up on a pipeline, and how the family's LoRA
    files map onto them."""

    models: Mapping[str, torch.nn.Module]
    lora_format: LoraFormat = FLUX_LORA

    def __getattr__(self, name: str) -> torch.nn.Module:
        try:
            return self.__dict__["models"][name]
        except KeyError:
            raise AttributeError(name) from None


def load_adapter(pipe: FluxPipeline, lora: LoraFile, name: str) -> None:
    """Load `lora` as adapter `name`, exactly as stock `pipe.load_lora_weights(path)` would.

    Diffusers reads a file's adapter config (its alpha) only when given a path; from the
    in-memory tensors we checked it would assume alpha = rank. So a file that carries a config
    is loaded through the same steps `load_lora_weights` takes, with the config passed in: the
    denoiser (a Flux transformer or a UNet), then each text encoder the pipeline has.
    """
    with CONSTRUCTION:
        _load_adapter(pipe, lora, name)


def _load_adapter(pipe: FluxPipeline, lora: LoraFile, name: str) -> None:
    if lora.adapter_metadata is None:
        pipe.load_lora_weights(dict(lora.state_dict), adapter_name=name)
        return
    state_dict = pipe.lora_state_dict(dict(lora.state_dict))
    network_alphas = None
    if isinstance(state_dict, tuple):  # UNet families: (state_dict, network_alphas)
        state_dict, network_alphas = state_dict
    common = {"adapter_name": name, "metadata": lora.adapter_metadata, "_pipeline": pipe}
    if hasattr(pipe, "load_lora_into_transformer"):
        pipe.load_lora_into_transformer(
            state_dict, network_alphas=network_alphas, transformer=pipe.transformer, **common
        )
    else:
        pipe.load_lora_into_unet(state_dict, network_alphas=network_alphas, unet=pipe.unet, **common)
    for prefix in ("text_encoder", "text_encoder_2"):
        if prefix in getattr(pipe, "_lora_loadable_modules", ()):
            pipe.load_lora_into_text_encoder(
                state_dict, network_alphas=network_alphas, text_encoder=getattr(pipe, prefix), prefix=prefix, **common
            )


def _check_key(
    pipe: FluxPipeline | LayerModels, key: str, shape: tuple[int, ...], ranks: dict[str, int], pattern: re.Pattern[str]
) -> str | None:
    match = pattern.match(key)
    if not match:
        return f"unexpected key {key!r}"
    component, module_path, which, kind = match.groups()
    try:
        module = getattr(pipe, component).get_submodule(module_path)
    except AttributeError:
        return f"{key!r} targets no layer of the {component}"
    module = getattr(module, "base_layer", module)  # already wrapped by a loaded adapter
    if not isinstance(module, torch.nn.Linear):
        return f"{key!r} targets a {type(module).__name__}, not a Linear layer"
    if kind == "bias":
        expected_bias = (module.out_features,)
        return None if which == "lora_B" and shape == expected_bias else f"{key!r} has shape {shape}"
    if len(shape) != 2:
        return f"{key!r} has shape {shape}, expected a matrix"
    rank = shape[0] if which == "lora_A" else shape[1]
    expected = (rank, module.in_features) if which == "lora_A" else (module.out_features, rank)
    if shape != expected:
        return f"{key!r} has shape {shape}, the layer needs {expected}"
    if ranks.setdefault(f"{component}.{module_path}", rank) != rank:
        return f"{key!r}: lora_A and lora_B ranks disagree"
    return None


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    file_reads: int = 0
    evictions: int = 0


@dataclass(frozen=True)
class ActiveLora:
    sha256: str
    scale: float


@dataclass
class LoraCache:
    """Keeps up to `capacity` adapters loaded in the pipeline, least recently used evicted first.

    A file whose (device, inode, size, mtime) is unchanged since it was read is not read again:
    its content hash is remembered, and the adapter under that hash is reused.
    """

    pipe: FluxPipeline
    capacity: int
    lora_dir: Path | None = None
    # The model family's LoRA layout; None: the family takes no LoRAs.
    lora_format: LoraFormat | None = FLUX_LORA
    stats: CacheStats = field(default_factory=CacheStats)
    _loaded: OrderedDict[str, str] = field(default_factory=OrderedDict)  # sha256 -> adapter name
    _hashes: dict[Path, tuple[tuple[int, int, int, int], str]] = field(default_factory=dict)
    # What `_apply` last set, so a repeat of the same LoRAs costs nothing. Loading or deleting
    # an adapter changes PEFT's state behind our back, so both reset it (and force enable_lora).
    _active: tuple[tuple[str, float], ...] | None = None
    _disabled: bool = True

    def resolve(self, ref: LoraRef) -> Path:
        if ref.path is not None:
            return ref.path
        if self.lora_dir is None:
            raise LoraError(f"LoRA id {ref.id!r} given but this engine has no LoRA directory")
        return self.lora_dir / f"{ref.id}.safetensors"

    @property
    def loaded(self) -> list[str]:
        """Content hashes of the loaded adapters, least recently used first."""
        return list(self._loaded)

    def activate(self, refs: list[LoraRef]) -> list[ActiveLora]:
        """Make exactly these LoRAs active with their scales; no LoRAs means the base model."""
        if len(refs) > self.capacity:
            raise LoraError(f"{len(refs)} LoRAs in one request; this engine holds at most {self.capacity}")
        scales: dict[str, float] = {}
        for ref in refs:
            sha = self._ensure_loaded(self.resolve(ref), keep=set(scales))
            scales[sha] = scales.get(sha, 0.0) + ref.scale  # LoRA deltas are linear in scale
        self._apply(scales)
        return [ActiveLora(sha, scale) for sha, scale in scales.items()]

    def _ensure_loaded(self, path: Path, keep: set[str]) -> str:
        sha = self._known_hash(path)
        if sha is not None and sha in self._loaded:
            self.stats.hits += 1
            self._loaded.move_to_end(sha)
            return sha
        lora = read_lora(path)
        self.stats.file_reads += 1
        self._remember_hash(path, lora.sha256)
        if lora.sha256 in self._loaded:
            self.stats.hits += 1
            self._loaded.move_to_end(lora.sha256)
            return lora.sha256
        self.stats.misses += 1
        if self.lora_format is None:
            raise LoraError(f"{path}: this profile's model family takes no LoRAs")
        check_lora_fits(self.pipe, lora, self.lora_format)
        while len(self._loaded) >= self.capacity:
            self._evict(keep)
        name = f"lora_{lora.sha256[:16]}"
        self._active, self._disabled = None, True  # a load (even a failed one) changes PEFT state
        try:
            with warnings.catch_warnings():
                # PEFT warns whenever a second adapter joins a model; that is the point of the cache.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                load_adapter(self.pipe, lora, name)
        except Exception as exc:  # diffusers/peft raise assorted types for bad weights
            raise LoraError(f"{path}: could not be loaded: {exc}") from exc
        self._loaded[lora.sha256] = name
        return lora.sha256

    def _evict(self, keep: set[str]) -> None:
        for sha, name in self._loaded.items():
            if sha not in keep:
                self.pipe.delete_adapters(name)
                del self._loaded[sha]
                self._active, self._disabled = None, True
                self.stats.evictions += 1
                return
        raise LoraError("LoRA cache is full of adapters this request needs")

    def _apply(self, scales: dict[str, float]) -> None:
        if not self._loaded:
            return  # no adapter was ever loaded: the model has no LoRA layers at all
        if not scales:
            if not self._disabled:
                self.pipe.disable_lora()
                self._disabled = True
            return
        wanted = tuple(scales.items())
        if wanted == self._active and not self._disabled:
            return  # already exactly this set with these scales: nothing to walk
        names = [self._loaded[sha] for sha in scales]
        self.pipe.set_adapters(names, adapter_weights=list(scales.values()))
        # enable_lora walks every layer again; only needed after a base-model request disabled them.
        if self._disabled:
            self.pipe.enable_lora()
            self._disabled = False
        self._active = wanted

    def _known_hash(self, path: Path) -> str | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        entry = self._hashes.get(path)
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        return entry[1] if entry and entry[0] == key else None

    def _remember_hash(self, path: Path, sha: str) -> None:
        stat = path.stat()
        self._hashes[path] = ((stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns), sha)
