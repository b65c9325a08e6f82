"""Building models in one thread while another loads a LoRA.

PEFT's loader (and diffusers' `from_pretrained`) patch process-wide globals while they run:
`nn.Module.register_parameter`, to put new parameters on the meta device. A miner or an
auditor builds engines and loads LoRAs from several threads, so every place that builds or
loads torch modules takes the engine's construction lock.
"""

from __future__ import annotations

import threading

from peft.tuners.lora import LoraModel

from dippy_studio.engine import Engine, EngineOptions, GenerationRequest, LoraRef
from dippy_studio.engine.synthetic import write_random_lora


def test_an_engine_built_while_another_thread_loads_a_lora_gets_real_weights(tmp_path, monkeypatch):
    loading = Engine(EngineOptions(profile="tiny"))
    path = tmp_path / "style.safetensors"
    write_random_lora(loading.pipe, path, seed=3)
    inside, release = threading.Event(), threading.Event()
    create_and_replace = LoraModel._create_and_replace

    def slow_create_and_replace(self, *args, **kwargs):
        # Runs inside PEFT's init_empty_weights: hold the loader here until the other build began.
        if not inside.is_set():
            inside.set()
            release.wait(timeout=30)
        return create_and_replace(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "_create_and_replace", slow_create_and_replace)
    request = GenerationRequest(prompt="a lighthouse", seed=1, steps=2, loras=[LoraRef(path=path)])
    errors: list[BaseException] = []

    def load() -> None:
        try:
            loading.generate(request)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=load)
    thread.start()
    assert inside.wait(timeout=60)
    # The build must wait for the load: give it the chance to run first, then let the load go on.
    threading.Timer(0.5, release.set).start()
    built = Engine(EngineOptions(profile="tiny"))
    thread.join(timeout=60)
    assert not errors, errors
    devices = {param.device.type for param in built.pipe.transformer.parameters()}
    assert devices == {"cpu"}
    assert built.generate(GenerationRequest(prompt="a lighthouse", seed=1, steps=2)).sha256 == (
        Engine(EngineOptions(profile="tiny")).generate(GenerationRequest(prompt="a lighthouse", seed=1, steps=2)).sha256
    )
