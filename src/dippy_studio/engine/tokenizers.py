"""Offline tokenizers for the built-in profiles.

Real Flux checkpoints ship their own tokenizers; the built-in profiles must work with no
files and no network, so their tokenizers are built here from fixed in-memory vocabularies.
They are small but real: the same classes, special tokens and padding rules as Flux uses.
"""

from __future__ import annotations

import string

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer, Qwen2Tokenizer, T5Tokenizer

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


# Qwen's chat markup, in the order of the real vocabulary's special tokens.
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's chat template reduced to what an image pipeline sends: text messages, the assistant
# turn opened by `add_generation_prompt`, and the empty thinking block `enable_thinking=False`
# adds. The same markup, token for token, as the real template for those inputs.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def qwen_tokenizer(model_max_length: int, whole_words: str = "", extra_special: tuple[str, ...] = ()) -> Qwen2Tokenizer:
    """A byte-level Qwen2 tokenizer (Qwen3 and Qwen2.5-VL use the same class): the 256 byte
    symbols and Qwen's chat special tokens, with Qwen's chat template. The real vocabulary has
    151k merged tokens; with no merges every byte is one token, so any prompt encodes.

    `whole_words`: text whose words (as Qwen's pre-tokenizer splits them) become single tokens
    through merges, as they are in the real vocabulary. A pipeline that drops a fixed number of
    leading tokens (Qwen-Image's system prompt) needs its fixed text to count as many tokens.
    `extra_special`: further special tokens (Qwen2.5-VL's vision markers)."""
    vocab = {symbol: index for index, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    specials = (*QWEN_SPECIAL, *extra_special)
    merges: list[tuple[str, str]] = []
    if whole_words:
        plain = _qwen(vocab, [], specials, model_max_length)
        for token in specials:  # special tokens are matched whole, before pre-tokenization
            whole_words = whole_words.replace(token, "\n")
        pieces = [piece for piece, _ in plain.backend_tokenizer.pre_tokenizer.pre_tokenize_str(whole_words)]
        for piece in pieces:
            # A left-to-right chain of merges builds the piece one symbol at a time.
            merged = piece[0]
            for symbol in piece[1:]:
                if merged + symbol not in vocab:
                    merges.append((merged, symbol))
                    vocab[merged + symbol] = len(vocab)
                merged += symbol
        # A chain can lose to an earlier one: " user" meets "user"'s merges first (BPE applies
        # merges by rank) and ends as " " + "user". Join what is left, last rank first.
        for piece in pieces:
            parts = _bpe(piece, merges)
            while len(parts) > 1:
                merges.append((parts[0], parts[1]))
                vocab.setdefault(parts[0] + parts[1], len(vocab))
                parts = _bpe(piece, merges)
    return _qwen(vocab, merges, specials, model_max_length)


def _bpe(piece: str, merges: list[tuple[str, str]]) -> list[str]:
    """`piece` split as byte-level BPE splits it with `merges` (lowest rank first)."""
    rank = {pair: index for index, pair in enumerate(merges)}
    parts = list(piece)
    while len(parts) > 1:
        best = min(range(len(parts) - 1), key=lambda i: rank.get((parts[i], parts[i + 1]), len(rank)))
        if (parts[best], parts[best + 1]) not in rank:
            return parts
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def _qwen(
    vocab: dict[str, int], merges: list[tuple[str, str]], specials: tuple[str, ...], model_max_length: int
) -> Qwen2Tokenizer:
    vocab = dict(vocab)
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials[1:])})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer
