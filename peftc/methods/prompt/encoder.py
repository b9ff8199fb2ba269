"""Prompt encoders at run time: they own the prompt parameters and run the wrapped model.

`PeftcModel.forward` / `generate` hand the call to the active encoder, so a task simply calls
`model(**batch)`. Two families:

- `VirtualTokenEncoder` (prompt tuning, P-tuning, multitask prompt tuning): n learned vectors
  are prepended to the input embeddings, x' = [P; E(x)]. The attention mask gets n ones in
  front, token types n zeros, explicit position ids become [0..n-1, p + n], and causal-LM labels
  n times -100 (nothing is predicted for a virtual token). Encoder-decoders get the prompt on
  the encoder side (multitask prompt tuning also prepends its second half to the decoder).
- `PrefixEncoder` (kv_prefix.py): per-layer key/value prefixes passed through transformers 5's
  `cache=` argument.

`generate` goes through transformers' own API (input_ids + inputs_embeds, or a prefilled
cache) so every decoding strategy works; the first token and every later one see exactly the
sequence `forward` sees.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from peftc.planning.plan import PromptPlan

IGNORE_INDEX = -100


class PromptEncoder(nn.Module):
    """Base of the runtime encoders. Subclasses hold the parameters (peft's names) and say what
    they save; the family base classes implement `forward_model` and `generate`."""

    def __init__(self, prompt: PromptPlan) -> None:
        super().__init__()
        self.num_virtual_tokens = prompt.num_virtual_tokens
        self.num_transformer_submodules = prompt.num_transformer_submodules
        self.token_dim = prompt.token_dim
        self.task_type = prompt.options["task_type"]
        self.is_encoder_decoder = bool(prompt.options["is_encoder_decoder"])
        self.inference_mode = bool(prompt.options.get("inference_mode", False))

    @property
    def total_tokens(self) -> int:
        return self.num_virtual_tokens * self.num_transformer_submodules

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """What peft's layout stores (`prompt_embeddings`: the encoder output, detached)."""
        raise NotImplementedError

    def load_saved(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Fill the encoder from saved tensors (only the inference form can take an encoder output)."""
        raise NotImplementedError

    def forward_model(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def generate(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    @torch.no_grad()
    def _copy_into(self, parameter: nn.Parameter, tensor: torch.Tensor, name: str) -> None:
        if tuple(tensor.shape) != tuple(parameter.shape):
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(parameter.shape)}")
        parameter.copy_(tensor.to(dtype=parameter.dtype, device=parameter.device))


# ------------------------------------------------------------------------------ helpers
def named_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """transformers models take input_ids as the first positional argument; allow that too."""
    if len(args) > 1:
        raise TypeError("pass model inputs by keyword (input_ids=..., attention_mask=..., ...)")
    if args:
        if "input_ids" in kwargs:
            raise TypeError("input_ids given both positionally and by keyword")
        kwargs = {"input_ids": args[0], **kwargs}
    return dict(kwargs)


def batch_size(kwargs: Mapping[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return int(kwargs[key].shape[0])
    raise ValueError("a prompt encoder needs input_ids or inputs_embeds")


def prepend(kwargs: dict[str, Any], key: str, value: int, count: int) -> None:
    """Put `count` columns of `value` in front of a (batch, seq) tensor, if it was given."""
    tensor = kwargs.get(key)
    if tensor is None:
        return
    front = torch.full((tensor.shape[0], count), value, dtype=tensor.dtype, device=tensor.device)
    kwargs[key] = torch.cat([front, tensor], dim=1)


def shift_positions(kwargs: dict[str, Any], count: int, *, with_virtual: bool) -> None:
    """Explicit position ids move back by `count`; virtual tokens take positions 0..count-1."""
    positions = kwargs.get("position_ids")
    if positions is None:
        return
    shifted = positions + count
    if with_virtual:
        front = torch.arange(count, dtype=positions.dtype, device=positions.device).expand(positions.shape[0], -1)
        shifted = torch.cat([front, shifted], dim=1)
    kwargs["position_ids"] = shifted


def ones_mask(kwargs: Mapping[str, Any], like: torch.Tensor) -> torch.Tensor:
    mask = kwargs.get("attention_mask")
    return mask if mask is not None else torch.ones(like.shape[:2], dtype=torch.long, device=like.device)


def generation_expand(base: nn.Module, kwargs: Mapping[str, Any]) -> int:
    """How many rows generate() makes of each input (beams / returned sequences), as transformers does."""
    config = kwargs.get("generation_config") or getattr(base, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", None)) or 1
    returned = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", None)) or 1
    return max(int(beams), int(returned))


def shift_right(labels: torch.Tensor, pad_token_id: int, start_token_id: int) -> torch.Tensor:
    """Decoder inputs from labels (teacher forcing): [start, y_0 .. y_{n-2}], -100 read as pad."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start_token_id
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)


# -------------------------------------------------------------------- virtual tokens
class VirtualTokenEncoder(PromptEncoder):
    """Prepends learned embeddings; subclasses implement `prompt_embeddings`."""

    decoder_prompts = False  # True: the second half of a seq2seq prompt goes to the decoder

    def prompt_embeddings(self, batch: int, task_ids: torch.Tensor | None) -> torch.Tensor:
        """(batch, total_tokens, token_dim): the prompt every row of the batch gets."""
        raise NotImplementedError

    def _prompts(self, base: nn.Module, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt, input embeddings) in the embeddings' dtype; pops input_ids/inputs_embeds."""
        input_ids = kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if input_ids is None:
                raise ValueError("a prompt encoder needs input_ids or inputs_embeds")
            embeds = base.get_input_embeddings()(input_ids)
        prompts = self.prompt_embeddings(embeds.shape[0], kwargs.pop("task_ids", None))
        return prompts.to(embeds.dtype), embeds

    def forward_model(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        kwargs = named_inputs(args, kwargs)
        prompts, embeds = self._prompts(base, kwargs)
        n = self.num_virtual_tokens
        kwargs["inputs_embeds"] = torch.cat([prompts[:, :n], embeds], dim=1)
        prepend(kwargs, "attention_mask", 1, n)
        prepend(kwargs, "token_type_ids", 0, n)
        shift_positions(kwargs, n, with_virtual=True)
        if self.is_encoder_decoder:
            if self.decoder_prompts:
                self._prepend_decoder(base, kwargs, prompts[:, n:])
        elif self.task_type == "CAUSAL_LM":
            prepend(kwargs, "labels", IGNORE_INDEX, n)
        return base(**kwargs)

    def _prepend_decoder(self, base: nn.Module, kwargs: dict[str, Any], prompts: torch.Tensor) -> None:
        """Decoder inputs become [P_dec; E(y_shifted)]; labels and decoder mask grow to match."""
        embeds = kwargs.pop("decoder_inputs_embeds", None)
        if embeds is None:
            ids = kwargs.pop("decoder_input_ids", None)
            if ids is None:
                if kwargs.get("labels") is None:
                    raise ValueError("decoder prompts need labels or decoder_input_ids")
                config = base.config
                ids = shift_right(kwargs["labels"], config.pad_token_id, config.decoder_start_token_id)
            embeds = base.get_input_embeddings()(ids)
        kwargs["decoder_inputs_embeds"] = torch.cat([prompts.to(embeds.dtype), embeds], dim=1)
        count = prompts.shape[1]
        prepend(kwargs, "labels", IGNORE_INDEX, count)
        prepend(kwargs, "decoder_attention_mask", 1, count)

    def generate(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        kwargs = named_inputs(args, kwargs)
        input_ids = kwargs.get("input_ids")
        prompts, embeds = self._prompts(base, kwargs)
        n = self.num_virtual_tokens
        kwargs["attention_mask"] = ones_mask(kwargs, embeds)
        prepend(kwargs, "attention_mask", 1, n)
        kwargs["inputs_embeds"] = torch.cat([prompts[:, :n], embeds], dim=1)
        if self.is_encoder_decoder:
            if self.decoder_prompts:
                self._prefill_decoder(base, kwargs, prompts[:, n:])
            return base.generate(**kwargs)
        prepend(kwargs, "token_type_ids", 0, n)
        shift_positions(kwargs, n, with_virtual=True)
        # Decoder-only: the embeddings drive the first step, input_ids head the returned
        # sequences (transformers' documented soft-prompt path).
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        return base.generate(**kwargs)

    def _prefill_decoder(self, base: nn.Module, kwargs: dict[str, Any], prompts: torch.Tensor) -> None:
        """Run the decoder over its virtual tokens once and hand generate() that cache: every
        generated token then follows [P_dec] exactly as in forward's teacher forcing."""
        expand = generation_expand(base, kwargs)
        encoder_outputs = base.get_encoder()(
            inputs_embeds=kwargs.pop("inputs_embeds"), attention_mask=kwargs["attention_mask"], return_dict=True
        )
        mask = kwargs["attention_mask"]
        states = encoder_outputs.last_hidden_state
        prefill = base(
            encoder_outputs=(states.repeat_interleave(expand, dim=0),),
            attention_mask=mask.repeat_interleave(expand, dim=0),
            decoder_inputs_embeds=prompts.repeat_interleave(expand, dim=0),
            use_cache=True,
        )
        kwargs["encoder_outputs"] = encoder_outputs
        kwargs["cache"] = prefill.cache if hasattr(prefill, "cache") else prefill.past_key_values
