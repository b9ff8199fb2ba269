"""AdaLoRA: the SVD-shaped adapter and its rank allocator."""

from peftc.methods.adalora import method  # noqa: F401  (registers peft=adalora)
