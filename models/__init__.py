import core.hub_kernels  # noqa: F401 - before peft imports bitsandbytes: no kernel code from the hub
import core.quiet  # noqa: F401 - before peft imports bitsandbytes: drops its known noise (core/quiet.py)
