"""FLUX.2 [dev]'s text side at toy sizes: a Mistral 3 encoder, its tokenizer and processor.

`Flux2Pipeline` encodes a prompt through its `tokenizer`, a `PixtralProcessor`
(`apply_chat_template` on system + user messages, padded to the sequence length), and stacks
hidden states 10, 20 and 30 of a `Mistral3ForConditionalGeneration`.

Stand-ins (the real ones are downloads, or need torchvision):
- Tokenizer: Mistral's byte-level BPE (Tekken) with its control tokens first, in their real
  order, then the 256 byte symbols and no merges, so any prompt encodes (one token a byte: the
  pipeline's fixed system message is 168 tokens, hence the built-in's sequence length of 512);
  Mistral Small 3's chat template for system and user text (and images as `[IMG]`).
- Processor: `PixtralProcessor` cannot be imported here (its module imports the torchvision
  image processor). `Flux2TextProcessor` is `PixtralProcessor`'s behaviour without that import:
  the same attributes, and the same expansion of each `[IMG]` into rows of patch tokens ended
  by `[IMG_BREAK]` and a final `[IMG_END]`, over the PIL `PixtralImageProcessorPil`. Stock
  diffusers loads a saved directory with it once this module is imported (model_index.json
  names its module). A real FLUX.2 [dev] directory names `PixtralProcessor` and so loads only
  where torchvision is installed.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil
from transformers.processing_utils import ProcessorMixin

# Tekken's first control tokens, at their real ids (0..19).
MISTRAL_SPECIAL = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)
# Mistral Small 3's chat template for what Flux2Pipeline sends: a system message, user messages
# of text (and image) parts, assistant turns.
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{%- else %}{%- set parts = message['content'] %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' }}{%- endif %}"
    "{%- for part in parts %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}"
    "{%- elif part['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if message['role'] == 'system' %}{{- '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[/INST]' }}"
    "{%- else %}{{- eos_token }}{%- endif %}"
    "{%- endfor %}"
)
# The vision tower's patch size at toy scale (the real one: 14, merged 2x2).
PATCH_SIZE = 8


def mistral_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level Tekken-like tokenizer: Mistral's control tokens, the 256 byte symbols."""
    vocab = {token: index for index, token in enumerate(MISTRAL_SPECIAL)}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=model_max_length,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(MISTRAL_SPECIAL[3:])})
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


class Flux2TextProcessor(ProcessorMixin):
    """`PixtralProcessor` without torchvision: a tokenizer and the PIL Pixtral image processor."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        patch_size: int = 16,
        spatial_merge_size: int = 1,
        chat_template: str | None = None,
        image_token: str = "[IMG]",
        image_break_token: str = "[IMG_BREAK]",
        image_end_token: str = "[IMG_END]",
        **kwargs: Any,
    ):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.image_token = image_token
        self.image_break_token = image_break_token
        self.image_end_token = image_end_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image_break_token_id = tokenizer.convert_tokens_to_ids(image_break_token)
        self.image_end_token_id = tokenizer.convert_tokens_to_ids(image_end_token)

    @property
    def image_token_ids(self) -> list[int]:
        return [self.image_token_id, self.image_break_token_id, self.image_end_token_id]

    def _process_images(self, images: Any, **images_kwargs: Any) -> Any:
        images_kwargs["patch_size"] = self.patch_size * self.spatial_merge_size
        return super()._process_images(images, **images_kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        # PixtralProcessor's: a row of patch tokens per patch row, each ended by a break, the
        # last token replaced by the image end.
        patch_size = self.patch_size * self.spatial_merge_size
        height, width = image_inputs["image_sizes"][image_idx]
        row = [self.image_token] * (width // patch_size) + [self.image_break_token]
        tokens = row * (height // patch_size)
        tokens[-1] = self.image_end_token
        return "".join(tokens)

    @property
    def model_input_names(self) -> list[str]:
        return self.tokenizer.model_input_names + self.image_processor.model_input_names + ["image_sizes"]


def text_processor(max_sequence_length: int, longest_edge: int = 64) -> Flux2TextProcessor:
    """The built-in's processor: the stand-in tokenizer and Pixtral's image processing at toy
    size (images scaled to at most `longest_edge`)."""
    tokenizer = mistral_tokenizer(max_sequence_length)
    images = PixtralImageProcessorPil(patch_size=PATCH_SIZE, size={"longest_edge": longest_edge})
    return Flux2TextProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=PATCH_SIZE, chat_template=MISTRAL_CHAT_TEMPLATE
    )


def text_encoder_config(width: int, layers: int, tokenizer: Any) -> Mistral3Config:
    """A `Mistral3ForConditionalGeneration` of `layers` text layers at `width`, with a one-layer
    Pixtral vision tower (built, as the class requires; the text stage never runs it)."""
    return Mistral3Config(
        text_config=dict(
            model_type="mistral",
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=width * 2,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=width // 2,
            max_position_embeddings=4096,
            sliding_window=None,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=8,
            patch_size=PATCH_SIZE,
            image_size=64,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=1,
        vision_feature_layer=-1,
    )


def text_encoder(width: int, layers: int, tokenizer: Any) -> Mistral3ForConditionalGeneration:
    return Mistral3ForConditionalGeneration(text_encoder_config(width, layers, tokenizer))
