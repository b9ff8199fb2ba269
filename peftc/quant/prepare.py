"""Preparing a (quantized) base for training adapters, driven by the quant and trainer config.

peft's `prepare_model_for_kbit_training`, made explicit: the base is frozen; with
`float32_unquantized` every weight left unquantized (norms, embeddings, output head) is kept in
float32 when model.dtype is 16-bit, so normalization and the loss run in full precision; with
`input_grads` the input embeddings' output requires grad, so a backward pass reaches adapters
below frozen blocks even when those blocks are checkpointed; `trainer.gradient_checkpointing`
recomputes each block's activations in the backward pass (non-reentrant).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from peftc.config.spec import TrainerSpec


def prepare_for_training(model: nn.Module, quant_spec: Any, trainer: TrainerSpec) -> nn.Module:
    model.requires_grad_(False)
    if getattr(quant_spec, "float32_unquantized", False):
        upcast_unquantized(model)
    if trainer.gradient_checkpointing:
        # transformers >= 5.24 (our floor) names it activation_checkpointing_enable; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if getattr(quant_spec, "input_grads", False) or trainer.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def upcast_unquantized(model: nn.Module) -> None:
    """Cast 16-bit parameters that are plain tensors to float32 (quantized weights are integer
    tensors or tensor subclasses and stay as they are; tied weights stay tied: same Parameter)."""
    import torch

    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and _is_plain(param):
            param.data = param.data.float()


def _is_plain(param: Any) -> bool:
    return not hasattr(type(param.data), "__tensor_flatten__")
