"""Offline tokenizers for the built-in profiles.

Real Flux checkpoints ship their own tokenizers; the built-in profiles must work with no
files and no network, so their tokenizers are built here from fixed in-memory vocabularies.
They are small but real: the same classes, special tokens and padding rules as Flux uses.
"""

from __future__ import annotations

import string

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer, T5Tokenizer

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer: the 256 byte symbols, their end-of-word forms, BOS and EOS.

    With no merges every character is one token, so any UTF-8 prompt tokenizes without <unk>.
    """
    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    for symbol in alphabet:
        vocab[symbol + "</w>"] = len(vocab)
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int) -> T5Tokenizer:
    """A character-level Unigram T5 tokenizer over printable ASCII (others map to <unk>)."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    chars = [c for c in string.printable if not c.isspace()]
    # Word-initial pieces score higher so "▁a" wins over "▁" + "a", as in SentencePiece models.
    pieces += [("▁" + c, -2.0) for c in chars]
    pieces += [(c, -3.0) for c in chars]
    pieces.append(("▁", -4.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
