"""Prompt-learning methods: virtual tokens, prompt encoders and key/value prefixes."""

from peftc.methods.prompt import (  # noqa: F401  (each registers its peft= option)
    adaption_prompt,
    multitask_prompt_tuning,
    p_tuning,
    prefix_tuning,
    prompt_tuning,
)
