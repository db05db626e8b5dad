import core.quiet  # noqa: F401 - before peft imports bitsandbytes: drops its known noise (core/quiet.py)
