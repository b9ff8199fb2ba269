"""The LyCORIS family: LoHa and LoKr over a shared adapter layer."""

from peftc.methods.lycoris import loha, lokr  # noqa: F401  (registers peft=loha, peft=lokr)
