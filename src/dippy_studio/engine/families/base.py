"""The interface every model family implements (`Family`), and what families share."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image

from dippy_studio.engine.errors import ProfileError
from dippy_studio.engine.lora import LayerModels, LoraFormat

if TYPE_CHECKING:
    from dippy_studio.engine.inputs import TaskImages


class Family(ABC):
    """One model family. Subclasses set the class attributes and implement the methods."""

    name: str
    # The pipeline class a profile is built, loaded and saved as, unless `profile_classes`
    # names another for it (a Kontext or Fill profile of the Flux family).
    default_class: type
    profile_classes: ClassVar[Mapping[str, type]] = {}
    # The pipeline class of each task the family can serve; a profile serves a subset.
    task_classes: ClassVar[Mapping[str, type]]
    # The models of a pipeline, in the order their weights are hashed; the first is the
    # denoiser (the one a dtype check, `torch.compile` and LoRA training look at).
    model_components: tuple[str, ...]
    # How LoRA files map onto the pipeline; None: the family refuses LoRAs.
    lora_format: LoraFormat | None
    trains_loras: bool

    @property
    def denoiser(self) -> str:
        return self.model_components[0]

    @property
    def supports_loras(self) -> bool:
        return self.lora_format is not None

    def pipeline_class(self, profile: str) -> type:
        return self.profile_classes.get(profile, self.default_class)

    def modules(self, pipe: Any) -> list[torch.nn.Module]:
        return [getattr(pipe, name) for name in self.model_components]

    def task_pipelines(self, pipe: Any, tasks: tuple[str, ...]) -> dict[str, Any]:
        """One pipeline per task, each built on `pipe`'s components (the same module objects, so
        the models are in memory once and a LoRA loaded through `pipe` applies to all of them)."""
        return {task: share_components(pipe, self.task_class(pipe, task)) for task in tasks}

    def task_class(self, pipe: Any, task: str) -> type:
        try:
            return self.task_classes[task]
        except KeyError:
            raise ProfileError(f"the {self.name} family serves no task {task!r}") from None

    def check_loaded(self, pipe: Any, path: Path) -> None:  # noqa: B027 (optional hook)
        """Refuse a directory that loaded as the pipeline class but cannot serve the profile."""

    @abstractmethod
    def build(self, config: Any, pipeline_class: type) -> Any:
        """The built-in pipeline for `config` (the family's own config type), seeded weights."""

    @abstractmethod
    def layer_models(self, config: Any | None, model_path: Path | None) -> LayerModels | None:
        """The models a LoRA may adapt, on the meta device (no weights), from a model directory
        or a built-in config; None when neither is given."""

    @abstractmethod
    def encode_prompt(self, pipe: Any, prompt: str, guidance: float, max_sequence_length: int) -> dict[str, Any]:
        """The text stage: pipeline keyword arguments (prompt embeddings) for `prompt`."""

    @abstractmethod
    def call_arguments(
        self,
        task: str,
        images: TaskImages | None,
        strength: float,
        width: int,
        height: int,
        max_sequence_length: int,
        guidance: float,
    ) -> dict[str, Any]:
        """What the task's pipeline takes beyond the prompt embeddings, steps, generator and
        callback: the output size, the input image and mask, the strength. The engine passes
        `guidance_scale=guidance` unless this overrides it."""

    @abstractmethod
    def decode(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> Image.Image:
        """Latents (`output_type="latent"`) to an image, with the pipeline's own arithmetic."""

    @abstractmethod
    def denoising_steps(self, steps: int, strength: float) -> int:
        """The steps img2img and inpainting run for `strength`, as the family's pipelines compute them."""


def share_components(pipe: Any, cls: type) -> Any:
    """`pipe` itself when it is a `cls`, else a `cls` built on `pipe`'s components."""
    if type(pipe) is cls:
        return pipe
    accepted = inspect.signature(cls.__init__).parameters
    built = cls(**{name: part for name, part in pipe.components.items() if name in accepted})
    built.set_progress_bar_config(disable=True)
    return built


def transformer_layer_models(
    transformer_class: type, config: Any | None, model_path: Path | None, lora_format: LoraFormat
) -> LayerModels | None:
    """`Family.layer_models` for families whose LoRAs adapt one transformer: its layers on the meta
    device (names and shapes, no weights), read from the model directory's config when given,
    else from the built-in config (`config.transformer`); None when neither is known."""
    with torch.device("meta"):
        if model_path is not None:
            try:
                transformer = transformer_class.from_config(transformer_class.load_config(model_path / "transformer"))
            except (OSError, ValueError) as exc:
                raise ProfileError(f"could not read the model architecture in {model_path}: {exc}") from exc
        elif config is not None:
            transformer = transformer_class(**config.transformer)
        else:
            return None
    return LayerModels({"transformer": transformer}, lora_format)
