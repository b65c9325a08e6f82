"""The tiny profile: the real Flux architecture, built offline, the same bits on every machine."""

from __future__ import annotations

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from dippy_studio.engine.builtin import TINY, build_pipeline
from dippy_studio.engine.fingerprint import weights_sha256

# Pinned: if this changes, every tiny-profile fingerprint and every recorded hash changes too.
TINY_WEIGHTS_SHA256 = "f2a0ad5e13e956972345e689ff6e3cfa774e80c62693ed490fe2d62a59458764"


def test_tiny_weights_are_pinned():
    assert weights_sha256(build_pipeline(TINY)) == TINY_WEIGHTS_SHA256


def test_tiny_is_the_flux_architecture_in_eval_mode():
    pipe = build_pipeline(TINY)
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert isinstance(pipe.tokenizer_2, T5Tokenizer)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        assert not module.training, "a module in train mode runs dropout and breaks determinism"


def test_offline_tokenizers_encode_prompts():
    pipe = build_pipeline(TINY)
    clip = pipe.tokenizer("a red cat").input_ids
    assert clip[0] == pipe.tokenizer.bos_token_id and clip[-1] == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.unk_token_id not in clip[1:-1]  # CLIP uses EOS as its unk token
    t5 = pipe.tokenizer_2("a red cat").input_ids
    assert t5[-1] == pipe.tokenizer_2.eos_token_id
    assert pipe.tokenizer_2.unk_token_id not in t5
    # Different prompts must give different token sequences, or prompts would not matter.
    assert pipe.tokenizer_2("a blue dog").input_ids != t5
