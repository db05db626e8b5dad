"""Layer 2, the model: loading a backbone (alias, GGUF, folder, hub; dtype, QLoRA), added-token vocabulary,
LoRA wrapping, the one loader of trained models, checkpoint discovery, the output head, optional kernels, FSDP2
sharding and synthetic models for tests. Imports only `core` and `tasks`; no Lightning."""

import core.hub_kernels  # noqa: F401 - before peft imports bitsandbytes: no kernel code from the hub
import core.quiet  # noqa: F401 - before peft imports bitsandbytes: drops its known noise (core/quiet.py)
