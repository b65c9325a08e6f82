"""Word-level tokenizers for the toy model: one token per word of its vocabulary.

A character-level tokenizer would make the text encoders learn spelling before meaning; with a
word per token they learn the few words the pictures are described with in a few hundred
steps. Both are built in code (no files), as fast tokenizers with the special tokens and
padding rules of CLIP (BOS ... EOS, padded with EOS) and T5 (... </s>, padded with <pad>), so
FluxPipeline's own prompt encoding runs unchanged and `save_pretrained` writes loadable files.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from dippy_studio.engine.toy.data import COLOURS, FILLER_WORDS, SHAPES

# Words the training captions never use, with token ids of their own (not <unk>), so a LoRA can
# teach one a meaning: a new colour, a position, a style.
SPARE_WORDS: tuple[str, ...] = (
    "orange", "pink", "grey", "brown", "left", "right", "top", "bottom", "center",
    "big", "small", "and", "the", "in", "style", "of", "picture", "shape",
)  # fmt: skip
WORDS: tuple[str, ...] = (*FILLER_WORDS, *COLOURS, *SHAPES, *SPARE_WORDS)

CLIP_BOS, CLIP_EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<unk>"
T5_PAD, T5_EOS = "<pad>", "</s>"


def _word_level(specials: list[str], max_length: int, template: str, **tokens: str) -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate([*specials, *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Case and punctuation carry nothing here: "A red circle." is the same prompt as "a red circle".
    tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex("[^a-z]+"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(token, vocab[token]) for token in specials if token in template]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=max_length, unk_token=UNK, **tokens)


def clip_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    """CLIP's conventions: BOS prompt EOS, padded with EOS (the pooled output is the first EOS)."""
    # EOS is id 1, not 2: CLIPTextModel treats eos_token_id 2 as a legacy config and pools the
    # highest token id instead of the EOS position.
    return _word_level(
        [CLIP_BOS, CLIP_EOS, UNK],
        max_length,
        f"{CLIP_BOS} $A {CLIP_EOS}",
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
    )


def t5_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    """T5's conventions: prompt </s>, padded with <pad> (id 0)."""
    return _word_level([T5_PAD, T5_EOS, UNK], max_length, f"$A {T5_EOS}", eos_token=T5_EOS, pad_token=T5_PAD)
