"""What the training benchmark compares: the mini-Llama model, the method configurations, and
one training step per library, built so that both sides do the same work.

A configuration is a list of peftc overrides. peft's config is built by peft itself from the
adapter_config.json peftc writes for that plan (`peft.get_peft_config`), the two models start
from one seeded base (deep copies), and peft's initial adapter tensors are copied into peftc's,
so both hold the same numbers and their losses can be checked against each other step by step.

One step, both sides: zero_grad(set_to_none=True); loss; backward; AdamW over the trainable
parameters (same hyperparameters); AdaLoRA's rank allocator after the optimizer step. The
loss is each library's own causal-LM loss: peftc's task loss (`CausalLm.training_loss` plus the
method's extra loss) and, for peft, the model's `labels` loss (transformers' cross-entropy plus
AdaLoRA's regulariser, which peft adds itself). Both are the mean next-token cross-entropy of the
same labels.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

MINI_LLAMA = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
BATCH, SEQ = 4, 256
LR = 1e-4
ALL_LINEAR = "peft.target_modules=all-linear"

# name -> peftc overrides (r=8 everywhere a rank applies; LoRA alpha 16, dropout 0)
CONFIGS: dict[str, tuple[str, ...]] = {
    "lora all-linear": ("peft=lora", "peft.r=8", "peft.lora_alpha=16", ALL_LINEAR),
    "lora q,v": ("peft=lora", "peft.r=8", "peft.lora_alpha=16", "peft.target_modules=[q_proj,v_proj]"),
    "dora all-linear": ("peft=lora", "peft.r=8", "peft.lora_alpha=16", "peft.use_dora=true", ALL_LINEAR),
    "ia3": ("peft=ia3",),  # Llama default: k_proj, v_proj, down_proj (feed-forward)
    "loha all-linear": ("peft=loha", "peft.r=8", "peft.alpha=8", ALL_LINEAR),
    "lokr all-linear": ("peft=lokr", "peft.r=8", "peft.alpha=8", ALL_LINEAR),
    "oft all-linear": ("peft=oft", "peft.oft_block_size=32", ALL_LINEAR),
    "adalora all-linear": ("peft=adalora", "peft.init_r=8", "peft.target_r=4", ALL_LINEAR),
    "prompt tuning": ("peft=prompt_tuning", "peft.num_virtual_tokens=20"),
    "prefix tuning": ("peft=prefix_tuning", "peft.num_virtual_tokens=20"),
    # the other methods at their defaults (Llama: q_proj and v_proj, the norms), for "no method slower than peft"
    "vera": ("peft=vera",),
    "hra": ("peft=hra", "peft.r=8"),
    "hra all-linear": ("peft=hra", "peft.r=8", ALL_LINEAR),
    "ln tuning": ("peft=ln_tuning",),
    "p-tuning": ("peft=p_tuning", "peft.num_virtual_tokens=20"),
    "adaption prompt": ("peft=adaption_prompt", "peft.adapter_layers=2"),
    # QLoRA: the base's Linear layers as bitsandbytes NF4 codes, products in bfloat16
    "qlora nf4 all-linear": (
        "peft=lora",
        "peft.r=8",
        "peft.lora_alpha=16",
        ALL_LINEAR,
        "quant=bnb_nf4",
        "quant.compute_dtype=bfloat16",
    ),
}
QUICK_CONFIGS = ("lora all-linear",)


def model_overrides(shape: dict[str, Any] = MINI_LLAMA, seq: int = SEQ, name: str = "mini_llama") -> list[str]:
    """peftc overrides for a config-built Llama of this shape (default: mini-Llama, sequence 256)."""
    config = "{" + ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in shape.items()) + "}"
    return ["model=tiny_llama", f"model.name={name}", f"model.config={config}", f"data.max_length={seq}"]


def compile_plan(
    name: str, total_steps: int = 1000, shape: dict[str, Any] = MINI_LLAMA, seq: int = SEQ, extra: tuple[str, ...] = ()
) -> Any:
    import peftc

    return peftc.compile([*model_overrides(shape, seq), *CONFIGS[name], f"trainer.max_steps={total_steps}", *extra])


def build_base(plan: Any) -> torch.nn.Module:
    """The seeded mini-Llama (float32) the plan was made for."""
    from peftc import tasks
    from peftc.planning import model_source

    task = tasks.get(plan.task)
    return model_source.build_model(plan.spec.model, task.auto_class_name, task.config_overrides(plan.spec.task))


def token_batch(
    seq: int = SEQ, vocab: int = MINI_LLAMA["vocab_size"], seed: int = 0, batch: int = BATCH
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@dataclass
class Side:
    """One library's model and its training step."""

    label: str
    model: torch.nn.Module
    loss: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    after_step: Callable[[int], None]
    optimizer: torch.optim.Optimizer | None = None
    steps: int = 0

    def __post_init__(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if params:
            self.optimizer = torch.optim.AdamW(params, lr=LR)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
        self.steps += 1
        self.after_step(self.steps)
        return float(loss.detach())


def quantized_base(plan: Any, base: torch.nn.Module, library: str) -> torch.nn.Module:
    """The base as each library trains a quantized plan (unchanged where the plan quantizes
    nothing). Both sides quantize through peftc's backend (bitsandbytes' own layers, as
    transformers' loader makes them: the same codes on both sides), then each prepares it its own
    way, doing the same work: peftc's `prepare_for_training` (unquantized 16-bit weights to
    float32, input grads) and peft's `prepare_model_for_kbit_training` (the same upcast), with
    gradient checkpointing as the plan says and input grads wherever peftc's side has them."""
    if plan.quantization is None:
        return base
    from peftc import quant
    from peftc.quant.prepare import prepare_for_training

    run = plan.spec
    base = quant.for_spec(run.quant).quantize(run.quant, base, plan.quantization.modules).eval()
    if library == "peftc":
        return prepare_for_training(base, run.quant, run.trainer)
    from peft import prepare_model_for_kbit_training

    checkpointing = run.trainer.gradient_checkpointing
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=checkpointing)
    if getattr(run.quant, "input_grads", False) and not checkpointing:  # peft enables them only with it
        base.enable_input_require_grads()
    return base


def peft_model(plan: Any, base: torch.nn.Module) -> torch.nn.Module:
    """peft's model for the plan, its config built by peft from peftc's adapter_config.json."""
    from peft import get_peft_config, get_peft_model

    from peftc.planning.layout import config_to_write

    return get_peft_model(base, get_peft_config({**config_to_write(plan.adapter_config), "inference_mode": False}))


def peftc_side(plan: Any, base: torch.nn.Module, peft_side_model: torch.nn.Module | None = None) -> Side:
    import peftc
    from peftc import methods, tasks

    model = peftc.materialize(plan, base_model=base)
    if peft_side_model is not None and plan.prompt is not None:
        # the encoder's own tensors (P-tuning saves its encoder's output, not the encoder)
        encoder = peft_side_model.prompt_encoder[plan.adapter_name]
        model.prompt_encoders[plan.adapter_name].load_state_dict(encoder.state_dict())
    elif peft_side_model is not None:
        from peft import get_peft_model_state_dict

        from peftc.files.load import fill

        fill(model, plan.adapter_name, get_peft_model_state_dict(peft_side_model))
    model.train()
    task, method = tasks.get(plan.task), methods.get(plan.method)

    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        value = task.training_loss(model, batch)
        extra = method.extra_loss(model, plan.adapter_name)
        return value if extra is None else value + extra

    after = _peftc_allocator(model, plan) if plan.method == "adalora" else _nothing
    return Side("peftc", model, loss, after)


def peftc_api_side(plan: Any, base: torch.nn.Module, peft_side_model: torch.nn.Module, *, chunked: bool = True) -> Side:
    """peftc trained the way a Python API user trains: `model(**batch).loss` (issue 17)."""
    side = peftc_side(plan, base, peft_side_model)
    model = side.model
    model.chunked_loss = chunked

    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    return Side("peftc API", model, loss, side.after_step)


def peft_side(plan: Any, base: torch.nn.Module) -> Side:
    model = peft_model(plan, base)
    model.train()

    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    after = (lambda step: model.base_model.update_and_allocate(step)) if plan.method == "adalora" else _nothing
    return Side("peft", model, loss, after)


def floor_side(base: torch.nn.Module) -> Side:
    """The frozen floor: every parameter frozen, gradients w.r.t. the input embeddings."""
    base.requires_grad_(False)
    base.train()
    embed = base.get_input_embeddings()

    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        embeds = embed(batch["input_ids"]).detach().requires_grad_(True)
        return base(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    return Side("floor", base, loss, _nothing)


def _peftc_allocator(model: Any, plan: Any) -> Callable[[int], None]:
    from peftc.methods.adalora.budget import RankAllocator

    allocator = RankAllocator(model, plan)
    return allocator.step


def _nothing(step: int) -> None:
    return None


def twin_sides(name: str, total_steps: int = 1000) -> tuple[Any, Side, Side]:
    """(plan, peftc side, peft side) on identical copies of the seeded base."""
    plan = compile_plan(name, total_steps)
    base = build_base(plan)
    theirs = peft_side(plan, copy.deepcopy(base))
    ours = peftc_side(plan, base, theirs.model)
    return plan, ours, theirs


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every trainable tensor away from its initial value, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.01 * torch.randn(param.shape, generator=generator))


# ------------------------------------------------------------------------------ memory
# With glibc's mmap threshold pinned low, every tensor-sized block is mmapped and handed back on
# free, so the resident set follows live memory and the kernel's high-water mark (VmHWM, which
# /proc/self/clear_refs resets) is the peak of live memory. main() re-executes itself with it.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def ensure_malloc_env() -> None:
    """Re-execute this process with MALLOC_ENV (glibc reads it only at start-up)."""
    import sys

    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.environ.update(MALLOC_ENV)
        os.execv(sys.executable, [sys.executable, *sys.argv])


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def measured_step(side: Side, batch: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    """(seconds, MiB of memory the step needed above what was resident before it, loss)."""
    import time

    with open("/proc/self/clear_refs", "w") as clear:  # reset VmHWM to the current RSS
        clear.write("5")
    before = status_mib("VmRSS")
    start = time.perf_counter()
    loss = side.step(batch)
    seconds = time.perf_counter() - start
    return seconds, status_mib("VmHWM") - before, loss
