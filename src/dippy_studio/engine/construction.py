"""One lock for building and loading torch modules in a process.

Diffusers' and PEFT's loaders patch process-wide state while they run: PEFT's LoRA loader
replaces `nn.Module.register_parameter` so that new parameters land on the meta device,
diffusers' `from_pretrained` skips `torch.nn.init` and sets torch's default dtype. Such a patch
reaches every thread, so a pipeline built in one thread while another loads a LoRA gets meta
parameters (or skipped initialisation, or the wrong dtype). Miners and auditors build engines
and load LoRAs from several threads; every place that builds or loads modules holds this lock.
"""

from __future__ import annotations

import threading

# Reentrant: loading a pipeline may build helper modules that take it again.
CONSTRUCTION = threading.RLock()
