"""Key/value prefixes at run time: every self-attention layer attends to n learned positions
before the real tokens, softmax(q [K_p; K]^T / sqrt(d)) [V_p; V].

The prefix table (n, layers * 2 * kv_heads * head_dim) is cut per layer into (key, value) of
shape (batch, kv_heads, n, head_dim), exactly as peft's get_prompt does, and handed to the model
through transformers 5's `cache=` argument: a `DynamicCache` for decoder-only and encoder-only
models (BERT included, which peft 0.21 refused on transformers 5 and 0.22 runs), an `EncoderDecoderCache`
whose self-attention part holds the prefix for encoder-decoders (decoder side, as peft does).
The attention mask gets n ones in front and explicit position ids move by n. A fresh cache is
built for every call, since the model appends the real tokens' keys to it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftc.methods.prompt.encoder import (
    PromptEncoder,
    batch_size,
    generation_expand,
    named_inputs,
    ones_mask,
    prepend,
    shift_positions,
)


class PrefixEncoder(PromptEncoder):
    """Subclasses implement `prefix_table`: (n, layers * 2 * token_dim), projection applied."""

    def __init__(self, prompt: Any) -> None:
        super().__init__(prompt)
        self.num_layers = prompt.num_layers
        self.num_heads = prompt.num_attention_heads
        self.head_dim = prompt.token_dim // prompt.num_attention_heads

    def prefix_table(self) -> torch.Tensor:
        raise NotImplementedError

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value), each (batch, kv_heads, n, head_dim)."""
        n = self.num_virtual_tokens
        table = self.prefix_table().to(dtype)
        # (n, layers*2*H*d) -> (layers*2, H, n, d): row 2l is layer l's key, 2l+1 its value.
        states = table.view(n, self.num_layers * 2, self.num_heads, self.head_dim).permute(1, 2, 0, 3)
        states = states.unsqueeze(1).expand(-1, batch, -1, -1, -1)
        # unbind, not one index per tensor: each indexing's backward writes a zero-filled gradient
        # of the whole table (2 x layers of them, summed), unbind's stacks the pieces once.
        rows = states.unbind(0)
        return [(rows[2 * pair], rows[2 * pair + 1]) for pair in map(self._pair_of, range(self.num_layers))]

    def _pair_of(self, layer: int) -> int:
        """Which (key, value) pair of the table layer `layer` reads.

        Encoder-decoders: peft duplicates the table for cross-attention by concatenating along
        the layer axis and then cuts chunks of four, so decoder layer l reads pair 2l mod L
        (with an even layer count, half the pairs are never used). We read it the same way so
        an adapter means the same thing in both libraries.
        """
        return (2 * layer) % self.num_layers if self.is_encoder_decoder else layer

    def cache(self, batch: int, dtype: torch.dtype) -> Any:
        from transformers import DynamicCache, EncoderDecoderCache

        prefix = DynamicCache(self.key_values(batch, dtype))
        if self.is_encoder_decoder:
            # Cross-attention starts empty: the model fills it from the encoder output.
            return EncoderDecoderCache(prefix, DynamicCache())
        return prefix

    def _inject(self, base: nn.Module, kwargs: dict[str, Any], rows: int) -> None:
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError(
                "prefix tuning supplies the cache itself; call generate() for incremental decoding "
                "instead of passing cache="
            )
        n = self.num_virtual_tokens
        if self.is_encoder_decoder:
            prepend(kwargs, "decoder_attention_mask", 1, n)
        else:
            shift_positions(kwargs, n, with_virtual=False)
        kwargs["cache"] = self.cache(rows, _dtype_of(base))

    def forward_model(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        kwargs = named_inputs(args, kwargs)
        if not self.is_encoder_decoder:
            prepend(kwargs, "attention_mask", 1, self.num_virtual_tokens)
        self._inject(base, kwargs, batch_size(kwargs))
        return base(**kwargs)

    def generate(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        kwargs = named_inputs(args, kwargs)
        rows = batch_size(kwargs)
        n = self.num_virtual_tokens
        if not self.is_encoder_decoder:
            like = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            kwargs["attention_mask"] = ones_mask(kwargs, like)
            prepend(kwargs, "attention_mask", 1, n)
            embeds = kwargs.get("inputs_embeds")
            if embeds is not None:
                # transformers reads a prefilled cache as covering the first positions of
                # inputs_embeds; n placeholder rows stand for the prefix and are never computed.
                kwargs["inputs_embeds"] = torch.cat([embeds.new_zeros(embeds.shape[0], n, embeds.shape[2]), embeds], 1)
        # generate() repeats inputs for beams / returned sequences but not a given cache.
        self._inject(base, kwargs, rows * generation_expand(base, kwargs))
        return base.generate(**kwargs)


def _dtype_of(base: nn.Module) -> torch.dtype:
    dtype = getattr(base, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return next((p.dtype for p in base.parameters() if p.is_floating_point()), torch.float32)
