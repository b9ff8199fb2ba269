"""LoRA and its variants (DoRA, initialisations, combination, the fused low-rank path)."""

from peftc.methods.lora import method  # noqa: F401  (registers peft=lora)
