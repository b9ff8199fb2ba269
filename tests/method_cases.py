"""The per-method parity harness's cases and pairing: every injectable method and option against
the peft package (the oracle). tests/test_methods.py holds one test body per behaviour.

A case is (method, model, overrides): Hydra overrides for a model= option, or spec fields
(`spec_fields`) for a custom test model (`CUSTOM_MODELS`: the convolutional one of
tests/conv_model.py, the mixture-of-experts one of tests/moe_model.py, the attention one of
tests/attention_model.py); `task=seq_cls` in the
overrides trains a classifier. The oracle's config is built by peft itself from OUR
adapter_config.json (`peft.get_peft_config`), so each case also checks our config mapping.
Both models start from the same base weights and the same seed (so inits that rewrite the base,
PiSSA and OLoRA, rewrite it identically). Adapters start from peft's non-identity init
(`RANDOM_INIT`), or for cases marked `perturb` from their own init moved as training would, and
our adapter receives peft's weights, so the two models hold the same numbers. To cover a new
method or option, add a case; to cover a new method, also add its non-identity init (RANDOM_INIT)
and a second adapter beside a first (STACK_CASES).
"""

from __future__ import annotations

import copy
import functools
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch

import peftc
from peftc import methods
from peftc.files.load import fill
from peftc.planning.layout import config_to_write
from peftc.planning.plan import Plan
from peftc.runtime.model import PeftcModel
from tests.attention_model import TinyAttention, sequences
from tests.conv_model import PaddedConvNet, TinyConvNet, images, plan_for
from tests.helpers import build_base, token_batch
from tests.moe_model import TinyMoE, features

# Plain nn.Modules planned from spec fields: name -> (model class, its input batch)
CUSTOM_MODELS = {
    "conv": (TinyConvNet, images),
    "padded": (PaddedConvNet, images),
    "moe": (TinyMoE, features),
    "mha": (TinyAttention, sequences),
}

# The field that makes a fresh adapter a non-identity (peft's init_weights=False equivalent);
# None for a method whose config has no such field: its cases must `perturb`.
RANDOM_INIT: dict[str, str | None] = {
    "lora": "init_lora_weights",
    "ia3": "init_ia3_weights",
    "loha": "init_weights",
    "lokr": "init_weights",
    "oft": "init_weights",
    "adalora": "init_lora_weights",
    "ln_tuning": None,  # the copies start equal to the base layers
    "hra": "init_weights",
    "vera": "init_weights",
}

# Methods whose default init is the identity only up to float32 rounding, with the tolerance of
# their no-op check (every other method's default init is checked bit-exact).
NO_OP_TOLERANCE: dict[str, float] = {
    "hra": 1e-4,  # its reflections cancel in equal pairs: (I - 2 u u^T)^2 = I, but not bit for bit
}

# peft 0.22 counts an attention's out_proj update once (huggingface/peft#3774), and peftc with it,
# but its unmerge rewrites the merged out_proj weight in place after the forward, so its backward
# runs through W without the update: out_proj's own gradients agree, in_proj's and everything
# upstream do not (peftc/methods/lora/attention.py; tests/test_lora_variants.py checks ours).
# tiny_bert's settings read by DistilBertConfig (hidden_size -> dim, num_attention_heads -> n_heads, ...)
TINY_DISTILBERT = ("model.model_type=distilbert", "+model.config.hidden_dim=128")
# Scaled word embeddings (forward = lookup * embed_scale): Gemma's keeps a tensor buffer, BART's a float
TINY_GEMMA3 = ("model.model_type=gemma3_text", "+model.config.head_dim=16")
TINY_BART = (
    "model.model_type=bart",
    "task=seq2seq_lm",
    "+model.config.scale_embedding=true",
    *(
        f"+model.config.{side}_{key}={value}"
        for side in ("encoder", "decoder")
        for key, value in (("layers", 1), ("ffn_dim", 64), ("attention_heads", 4))
    ),
)
MHA_GRADIENTS = "peft 0.22 MultiheadAttention: backward runs through out_proj's base weight, not W + s B A"

# peft keeps some adapter bookkeeping as frozen Parameters that peftc keeps as plain numbers.
PEFT_ONLY_PARAMS = ("ranknum",)  # AdaLoRA: the initial rank, used in the scaling


@dataclass(frozen=True)
class Case:
    method: str
    model: str  # a model= option, or a CUSTOM_MODELS name
    overrides: tuple[str, ...] = ()
    spec_fields: tuple[tuple[str, Any], ...] = ()  # spec fields for a custom model (tuples: hashable)
    tolerance: float = 1e-5  # float32 outputs, ours vs peft's
    perturb: bool = False  # move the trainable tensors off their init (inits that are no-ops or rewrite the base)
    mergeable: bool = True  # False: merging must be refused (as peft refuses it)
    peft_gradients_wrong: str = ""  # why peft's own gradients are wrong here (ours are checked elsewhere)

    @property
    def id(self) -> str:
        fields = [f"{k}={v}" for k, v in self.spec_fields]
        return " ".join([self.method, self.model, *self.overrides, *fields])

    @property
    def custom(self) -> bool:
        return self.model in CUSTOM_MODELS

    @property
    def classifies(self) -> bool:
        return "task=seq_cls" in self.overrides

    def compile(self) -> Plan:
        return _compiled(self)

    def base(self, plan: Plan) -> torch.nn.Module:
        return CUSTOM_MODELS[self.model][0]() if self.custom else build_base(plan)

    def inputs(self) -> torch.Tensor:
        return CUSTOM_MODELS[self.model][1]() if self.custom else token_batch()

    def loss(self, model: torch.nn.Module) -> torch.Tensor:
        x = self.inputs()
        if self.custom:
            return model(input_ids=x).square().mean()
        return model(input_ids=x, labels=torch.arange(x.shape[0]) % 2 if self.classifies else x).loss


def random_init_overrides(method: str) -> list[str]:
    """The Hydra overrides that start a fresh adapter of `method` off the identity (none if it has no such field)."""
    init = RANDOM_INIT[method]
    return [f"peft.{init}=false"] if init else []


@functools.cache
def _compiled(case: Case) -> Plan:  # plans are immutable; composing dominates a pairing's cost
    init = RANDOM_INIT[case.method]
    if case.custom:
        schema = methods.get(case.method).schema
        fields = {init: False} if init else {}
        return plan_for(CUSTOM_MODELS[case.model][0](), schema(**fields, **dict(case.spec_fields)))
    return peftc.compile(
        [f"peft={case.method}", f"model={case.model}", *random_init_overrides(case.method), *case.overrides]
    )


CASES = [
    Case("lora", "tiny_llama"),
    Case("lora", "tiny_llama", ("peft.target_modules=all-linear", "peft.r=4", "peft.modules_to_save=[lm_head]")),
    Case("lora", "tiny_gpt2"),
    Case("ia3", "tiny_llama"),
    Case("ia3", "tiny_llama", ("peft.target_modules=[q_proj,up_proj,down_proj]", "peft.feedforward_modules=[up_proj]")),
    Case("ia3", "tiny_llama", ("peft.target_modules=[q_proj,o_proj]",)),  # default feed-forward matches no target
    Case("ia3", "tiny_gpt2"),
    Case("ia3", "tiny_gpt2", ("peft.target_modules=all-linear", "peft.feedforward_modules=.*mlp\\.c_proj")),
    Case("loha", "tiny_llama"),
    Case(
        "loha",
        "tiny_llama",
        (
            "peft.target_modules=all-linear",
            "peft.r=2",
            "peft.rank_pattern={up_proj: 4}",
            "peft.alpha_pattern={o_proj: 3}",
            "peft.modules_to_save=[lm_head]",
        ),
    ),
    Case("lokr", "tiny_llama"),
    Case(
        "lokr",
        "tiny_llama",
        (
            "peft.target_modules=all-linear",
            "peft.r=2",
            "peft.decompose_both=true",
            "peft.rank_pattern={gate_proj: 6}",
            "peft.alpha_pattern={k_proj: 5}",
        ),
    ),
    Case(
        "lokr",
        "tiny_llama",
        (
            "peft.target_modules=[o_proj,down_proj]",
            "peft.decompose_factor=4",
            "peft.r=1",
            "peft.layers_to_transform=[1]",
        ),
    ),
    Case("oft", "tiny_llama"),
    Case(
        "oft",
        "tiny_llama",
        ("peft.target_modules=all-linear", "peft.oft_block_size=0", "peft.r=8", "peft.use_cayley_neumann=false"),
    ),
    Case(
        "oft",
        "tiny_llama",
        (
            "peft.target_modules=[q_proj,down_proj,embed_tokens]",
            "peft.oft_block_size=16",
            "peft.block_share=true",
            "peft.num_cayley_neumann_terms=3",
        ),
    ),
    Case(
        "oft",
        "tiny_llama",
        ("peft.target_modules=[k_proj,up_proj]", "peft.coft=true", "peft.eps=0.05", "peft.modules_to_save=[lm_head]"),
    ),
    Case(
        "oft",
        "tiny_llama",
        ("peft.oft_block_size=24", "peft.adjust_block_size=true", "peft.target_modules=[q_proj,down_proj]"),
    ),
    # AdaLoRA's random init draws A, E, B from N(0, 1): a small lora_alpha keeps the update the
    # size of the base weights (alpha=8 makes it ~300x larger, and logits then differ by ~1e-5
    # from float32 rounding alone).
    Case("adalora", "tiny_llama", ("peft.lora_alpha=0.01",)),
    Case(
        "adalora",
        "tiny_llama",
        (
            "peft.target_modules=[q_proj,k_proj,o_proj,down_proj]",
            "peft.init_r=4",
            "peft.target_r=2",
            "peft.lora_alpha=0.02",
            "peft.layers_to_transform=[0]",
            "peft.modules_to_save=[lm_head]",
        ),
    ),
    Case("adalora", "tiny_gpt2", ("peft.lora_alpha=0.01",)),
    # LoRA variants and options, each from its own init moved like training would (`perturb`)
    Case("lora", "tiny_llama", ("peft.use_dora=true",), perturb=True),
    Case("lora", "tiny_llama", ("peft.use_dora=true", "peft.lora_dropout=0.1"), perturb=True),
    Case("lora", "tiny_gpt2", ("peft.use_dora=true", "peft.target_modules=all-linear", "peft.r=4"), perturb=True),
    Case("lora", "tiny_llama", ("peft.use_dora=true", "peft.target_modules=[embed_tokens,v_proj]"), perturb=True),
    Case(
        "lora",
        "tiny_llama",
        (
            "peft.use_dora=true",
            "peft.use_rslora=true",
            "peft.target_modules=[q_proj,v_proj,o_proj,up_proj,down_proj,gate_proj]",
            "peft.rank_pattern={down_proj: 2}",
            "peft.alpha_pattern={o_proj: 3}",
            "peft.layers_to_transform=[1]",
            "peft.exclude_modules=[gate_proj]",
        ),
        perturb=True,
    ),
    Case("lora", "tiny_llama", ("peft.init_lora_weights=gaussian",), perturb=True),
    Case(
        "lora", "tiny_llama", ("peft.init_lora_weights=pissa", "peft.target_modules=[q_proj,down_proj]"), perturb=True
    ),
    Case("lora", "tiny_llama", ("peft.init_lora_weights=pissa_niter_2", "peft.r=4"), perturb=True),
    Case("lora", "tiny_gpt2", ("peft.init_lora_weights=pissa", "peft.use_dora=true"), perturb=True),
    Case(
        "lora", "tiny_llama", ("peft.init_lora_weights=olora", "peft.target_modules=[q_proj,down_proj]"), perturb=True
    ),
    # on GPT-2's Conv1D (weight stored (in, out)): QR of the transposed weight (peft 0.22), scaling 2
    Case("lora", "tiny_gpt2", ("peft.init_lora_weights=olora", "peft.lora_alpha=16"), perturb=True),
    Case("lora", "tiny_llama", ("peft.init_lora_weights=orthogonal", "peft.r=4"), perturb=True),
    Case("lora", "tiny_gpt2", ("peft.bias=all",), perturb=True),
    Case("lora", "tiny_gpt2", ("peft.bias=all", "peft.modules_to_save=[ln_f]"), perturb=True),
    Case("lora", "tiny_gpt2", ("peft.bias=lora_only", "peft.target_modules=all-linear"), perturb=True),
    Case("lora", "tiny_gpt2", ("peft.lora_bias=true",), perturb=True),
    # trainable tokens: new special tokens' rows trained in full beside the adapter
    Case("lora", "tiny_llama", ("peft.trainable_token_indices=[13,51,176]",), perturb=True),  # in token_batch()
    # on GPT-2's tied embedding: peft ties lm_head's rows to the embedding's, saved once
    Case("lora", "tiny_gpt2", ("peft.trainable_token_indices=[13,51,176]",), perturb=True),
    Case(
        "lora", "tiny_bert", ("task=seq_cls", "peft.trainable_token_indices={word_embeddings: [13,51]}"), perturb=True
    ),
    # scaled embeddings: the update is scaled as the base's lookup is (peft 0.22), so merging keeps the outputs
    Case("lora", "tiny_llama", (*TINY_GEMMA3, "peft.target_modules=[embed_tokens,q_proj]")),
    Case(
        "lora", "tiny_llama", (*TINY_GEMMA3, "peft.target_modules=[embed_tokens]", "peft.use_dora=true"), perturb=True
    ),
    Case("lora", "tiny_llama", (*TINY_GEMMA3, "peft.trainable_token_indices=[13,51,176]"), perturb=True),
    Case("lora", "tiny_t5", (*TINY_BART, "peft.target_modules=[embed_tokens,q_proj]")),
    Case("lora", "tiny_bert", ("task=seq_cls", "peft.use_dora=true", "peft.bias=all"), perturb=True),
    Case("oft", "tiny_bert", ("task=seq_cls", "peft.bias=all"), perturb=True),
    # DistilBERT's head is pre_classifier then classifier, both initialised at random: peft 0.22 trains both
    Case("lora", "tiny_bert", ("task=seq_cls", *TINY_DISTILBERT, "peft.target_modules=[q_lin,v_lin]"), perturb=True),
    Case("oft", "tiny_bert", ("peft.bias=oft_only", "peft.target_modules=[query,key]"), perturb=True),
    # LN tuning: trained copies of the norms (RMSNorm; LayerNorm with bias; a classifier's norms)
    Case("ln_tuning", "tiny_llama", perturb=True),
    Case("ln_tuning", "tiny_gpt2", perturb=True),
    Case(
        "ln_tuning",
        "tiny_bert",
        ("task=seq_cls", "peft.target_modules=[LayerNorm]", "peft.exclude_modules=[embeddings.LayerNorm]"),
        perturb=True,
    ),
    # HRA: W H with H a chain of Householder reflections (or one from Gram-Schmidt vectors)
    Case("hra", "tiny_llama"),
    Case(
        "hra",
        "tiny_llama",
        (
            "peft.apply_GS=true",
            "peft.r=4",
            "peft.target_modules=[q_proj,o_proj,down_proj]",
            "peft.layers_to_transform=[1]",
            "peft.modules_to_save=[lm_head]",
        ),
    ),
    Case("hra", "tiny_bert", ("task=seq_cls", "peft.bias=hra_only"), perturb=True),
    # VeRA: frozen random A, B shared by all layers (sliced per layer), trained vectors lambda_b, lambda_d
    Case("vera", "tiny_llama", ("peft.r=8",)),
    Case(
        "vera",
        "tiny_llama",
        (
            "peft.r=4",
            "peft.save_projection=false",  # A and B drawn again from the key: ours must equal peft's
            "peft.projection_prng_key=3",
            "peft.target_modules=[q_proj,up_proj,down_proj]",  # in/out sizes differ: each layer's slices
            "peft.layers_to_transform=[1]",
            "peft.modules_to_save=[lm_head]",
        ),
    ),
    Case("vera", "tiny_gpt2", ("peft.r=4", "peft.vera_dropout=0.1", "peft.bias=all"), perturb=True),  # Conv1D
    Case("vera", "tiny_bert", ("task=seq_cls", "peft.r=4", "peft.bias=vera_only", "peft.d_initial=0.5"), perturb=True),
    # Convolutions (tests/conv_model.py: conv 3x3, pointwise 1x1, grouped 3x3 groups=2, seq Conv1d k3, head Linear)
    Case(
        "ia3",
        "conv",
        spec_fields=(
            ("target_modules", ("conv", "pointwise", "grouped")),
            ("feedforward_modules", ("pointwise", "grouped")),
        ),
    ),
    Case("loha", "conv", spec_fields=(("target_modules", ("conv", "pointwise", "grouped", "seq", "head")), ("r", 2))),
    Case(
        "loha",
        "conv",
        spec_fields=(("target_modules", ("conv", "pointwise", "seq")), ("r", 2), ("use_effective_conv2d", True)),
    ),
    Case("lokr", "conv", spec_fields=(("target_modules", ("conv", "pointwise", "grouped", "seq")), ("r", 1))),
    # (not "seq": peft 0.21 cannot run LoKr's CP form on a Conv1d, a torch.kron stride quirk peftc avoids)
    Case(
        "lokr",
        "conv",
        spec_fields=(
            ("target_modules", ("conv", "pointwise")),
            ("r", 1),
            ("decompose_both", True),
            ("use_effective_conv2d", True),
        ),
    ),
    Case("lokr", "conv", spec_fields=(("target_modules", ("conv", "pointwise", "seq")), ("r", 8))),  # full W2
    Case("hra", "conv", spec_fields=(("target_modules", ("conv", "pointwise", "head")), ("r", 4))),
    Case("hra", "conv", spec_fields=(("target_modules", ("conv", "pointwise")), ("r", 4), ("apply_GS", True))),
    Case(
        "adalora",
        "conv",
        spec_fields=(
            ("target_modules", ("conv", "pointwise", "head")),
            ("init_r", 4),
            ("target_r", 2),
            ("lora_alpha", 0.1),
        ),
    ),
    Case("lora", "conv", spec_fields=(("target_modules", ("conv", "pointwise", "seq")), ("r", 4)), perturb=True),
    Case(
        "lora",
        "conv",
        spec_fields=(("target_modules", ("conv", "seq", "head")), ("use_dora", True), ("bias", "all")),
        perturb=True,
    ),
    Case(
        "lora",
        "conv",
        spec_fields=(("target_modules", ("conv", "pointwise")), ("lora_bias", True), ("r", 2)),
        perturb=True,
    ),
    Case(
        "lora",
        "conv",
        spec_fields=(("target_modules", ("volume", "pointwise")), ("use_dora", True), ("r", 2)),
        perturb=True,
    ),
    # OFT on Conv2d rotates the weight over in_channels x k x k (peft 0.22), so 1x1 and 3x3 convs
    # both merge; peft refuses grouped convs (tests/test_methods.py checks peftc's plan error)
    Case("oft", "conv", spec_fields=(("target_modules", ("pointwise",)), ("oft_block_size", 4)), perturb=True),
    Case("oft", "conv", spec_fields=(("target_modules", ("conv",)), ("r", 3), ("oft_block_size", 0)), perturb=True),
    # peft cannot merge LoRA into a grouped convolution (its delta has the wrong shape); nor can we
    Case("lora", "conv", spec_fields=(("target_modules", ("grouped",)), ("r", 4)), perturb=True, mergeable=False),
    # DoRA there too, with peft's norm of a grouped update (B viewed as (out/groups, r) times A)
    Case(
        "lora",
        "conv",
        spec_fields=(("target_modules", ("grouped",)), ("r", 4), ("use_dora", True)),
        perturb=True,
        mergeable=False,
    ),
    # Convolutions that pad with reflect/circular/replicate (tests/conv_model.py: PaddedConvNet; its
    # circular one also dilated, with a non-square kernel): each update convolves as the base does
    Case(
        "lora",
        "padded",
        spec_fields=(("target_modules", ("reflect", "circular", "replicate")), ("r", 4)),
        perturb=True,
    ),
    Case(
        "lora",
        "padded",
        spec_fields=(
            ("target_modules", ("reflect", "circular", "replicate")),
            ("use_dora", True),
            ("lora_dropout", 0.1),
        ),
        perturb=True,
    ),
    Case("loha", "padded", spec_fields=(("target_modules", ("reflect", "circular", "replicate")), ("r", 2))),
    Case("lokr", "padded", spec_fields=(("target_modules", ("reflect", "circular", "replicate")), ("r", 1))),
    Case(
        "adalora",
        "padded",
        spec_fields=(("target_modules", ("reflect", "circular")), ("init_r", 4), ("target_r", 2), ("lora_alpha", 0.1)),
    ),
    Case("hra", "padded", spec_fields=(("target_modules", ("reflect", "circular")), ("r", 4))),
    # OFT rotates the weight: the base convolves with it, padding, stride and dilation included
    Case(
        "oft", "padded", spec_fields=(("target_modules", ("reflect", "circular")), ("oft_block_size", 6)), perturb=True
    ),
    # Raw parameters (target_parameters; tests/moe_model.py): an (experts, out, in) stack whose two
    # parameters nest peft's wrappers; gpt-oss's (experts, in, out) stack, a raw 2-D weight and an
    # nn.Linear's weight beside a module target, with bias=lora_only (peft trains that Linear's bias)
    Case(
        "lora",
        "moe",
        spec_fields=(
            ("target_modules", ()),
            ("target_parameters", ("experts.gate_up_proj", "experts.down_proj")),
            ("r", 2),
        ),
        perturb=True,
    ),
    Case(
        "lora",
        "moe",
        spec_fields=(
            ("target_modules", ("router",)),
            ("target_parameters", ("shared.down_proj", "mixer.weight", "head.weight")),
            ("use_rslora", True),
            ("bias", "lora_only"),
        ),
        perturb=True,
    ),
    # null target_modules keep the model type's defaults beside the parameters, as in peft
    Case("lora", "tiny_llama", ("peft.target_parameters=[mlp.down_proj.weight]",), perturb=True),
    # nn.MultiheadAttention: in_proj on the attention's site, out_proj nested inside it (peft's
    # layout); peft ignores dropout there (it merges around the call) and trains out_proj's bias
    # with lora_only
    Case(
        "lora",
        "mha",
        spec_fields=(("target_modules", ("attn",)), ("r", 2)),
        perturb=True,
        peft_gradients_wrong=MHA_GRADIENTS,
    ),
    Case(
        "lora",
        "mha",
        spec_fields=(("target_modules", ("attn", "head")), ("lora_dropout", 0.1), ("bias", "lora_only")),
        perturb=True,
        peft_gradients_wrong=MHA_GRADIENTS,
    ),
]
IDS = [case.id for case in CASES]


@dataclass(frozen=True)
class StackCase:
    """A second adapter of the same method beside `first`'s, run alone and then with the first."""

    first: Case
    second: tuple[str, ...]  # the second adapter's overrides, on the first's model
    # peft refuses to run the two adapters together (LN tuning runs one at a time); ours must too
    one_active: bool = False
    inference_mode: bool = False  # peft adds the second adapter frozen (it trains one AdaLoRA adapter at a time)

    @property
    def id(self) -> str:
        return self.first.method

    def second_plan(self) -> Plan:
        return Case(self.first.method, self.first.model, self.second).compile()


# A small AdaLoRA alpha keeps its N(0, 1) random update the size of the base weights (see CASES).
_ADALORA_SMALL = ("peft.lora_alpha=0.01",)
STACK_CASES = [
    *(
        StackCase(Case(method, "tiny_llama"), ("peft.target_modules=[v_proj,o_proj]",))
        for method in ("ia3", "loha", "lokr", "lora", "oft")
    ),
    StackCase(
        Case("adalora", "tiny_llama", _ADALORA_SMALL),
        ("peft.target_modules=[v_proj,o_proj]", *_ADALORA_SMALL),
        inference_mode=True,
    ),
    StackCase(Case("ln_tuning", "tiny_llama", perturb=True), (), one_active=True),
    StackCase(Case("hra", "tiny_llama"), ("peft.target_modules=[v_proj,o_proj]",)),
    StackCase(Case("vera", "tiny_llama", ("peft.r=8",)), ("peft.r=8", "peft.target_modules=[v_proj,o_proj]")),
]


@dataclass
class Pair:
    plan: Plan
    ours: PeftcModel
    theirs: Any  # a peft.PeftModel


def oracle_config(plan: Plan, case: Case) -> object:
    """peft's config for a plan, built by peft from the adapter_config.json we would write."""
    from peft import get_peft_config

    config = {**config_to_write(plan.adapter_config), "inference_mode": False}
    if case.custom:
        config["task_type"] = None  # a plain nn.Module: peft's task wrappers expect a transformers model
    return get_peft_config(config)


def paired(case: Case) -> Pair:
    """Our model and peft's on identical base weights and seeds, with peft's adapter weights copied
    into ours. Built once per case; every caller gets its own deep copy (building costs far more)."""
    plan, ours, theirs = _pair(case)
    return Pair(plan, copy.deepcopy(ours), copy.deepcopy(theirs))


@functools.cache
def _pair(case: Case) -> tuple[Plan, PeftcModel, Any]:
    from peft import get_peft_model

    plan = case.compile()
    base = case.base(plan)
    torch.manual_seed(0)  # peft's random init (and PiSSA's randomized SVD): the same numbers whatever ran before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on fan_in_fan_out, rank_pattern, PiSSA, ...
        theirs = get_peft_model(copy.deepcopy(base), oracle_config(plan, case)).eval()
    torch.manual_seed(0)  # ours draws what peft drew where the init rewrites the base (pissa_niter)
    ours = peftc.materialize(plan, base_model=base).eval()
    if case.perturb:
        perturb(theirs)
    fill(ours, plan.adapter_name, peft_state(theirs))
    return plan, ours, theirs


def stack_second_adapter(pair: Pair, case: Case, name: str = "other") -> None:
    """A second adapter of the same plan on both sides (peft's fresh draw copied into ours), both
    active: the stacked configuration peft and peftc must compute alike."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        pair.theirs.add_adapter(name, oracle_config(pair.plan, case))
    pair.ours.add_adapter(name, pair.plan)
    fill(pair.ours, name, peft_state(pair.theirs, adapter_name=name))
    pair.theirs.base_model.set_adapter(["default", name])
    pair.ours.set_adapter(["default", name])


def perturb(model: torch.nn.Module) -> None:
    """Move every trainable tensor away from its initial value, as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def peft_state(model: Any, params: bool = False, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """peft's saved names -> its tensors (the live Parameters with `params`, to reach their grads).

    Leaves out the copies peft adds with bias='all' inside modules_to_save wrappers
    (`.original_module.bias`, `.modules_to_save.bias`): peftc neither writes nor needs them
    (see peftc.files.load._without_peft_artifacts).
    """
    from peft import get_peft_model_state_dict

    state = model.state_dict(keep_vars=True) if params else None  # buffers too: VeRA's saved projections
    tensors = get_peft_model_state_dict(model, state_dict=state, adapter_name=adapter_name)
    return {k: v for k, v in tensors.items() if ".original_module." not in k and ".modules_to_save." not in k}


def output(model: torch.nn.Module, case: Case) -> torch.Tensor:
    with torch.no_grad():
        result = model(input_ids=case.inputs())
    return result if case.custom else result.logits


def logits(model: torch.nn.Module) -> torch.Tensor:
    """A causal LM's logits on the shared token batch."""
    with torch.no_grad():
        return model(input_ids=token_batch()).logits


def base_weights(model: PeftcModel) -> dict[str, torch.Tensor]:
    """Copies of the base tensors of every adapted layer (what merging may change)."""
    return {
        f"{path}.{name}": tensor.detach().clone()
        for path, layer in model.adapter_layers()
        for name, tensor in layer.base_layer.state_dict().items()
    }


@functools.cache
def _adapter_tensor() -> re.Pattern[str]:
    """Adapter tensors of every registered method (peft names them by the method's prefix: lora_A,
    hada_w1, ...), in peft's and our state dicts: what base_state leaves out."""
    prefixes = sorted({m.tensor_prefix for m in methods.all_methods().values() if m.kind == "injectable"} - {""})
    names = "|".join(map(re.escape, [*prefixes, *PEFT_ONLY_PARAMS]))
    return re.compile(rf"\.({names})|modules_to_save\.|original_module\.|token_adapter\.(default|trainable)")


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every base-model tensor of ours or peft's model, keyed by module path (adapters left out)."""
    from peft import PeftModel

    prefix = "base_model.model." if isinstance(model, PeftModel) else "base_model."
    return {
        # peft wraps a trainable-tokens embedding twice (<emb>.token_adapter.base_layer.weight)
        name.removeprefix(prefix).replace(".token_adapter.base_layer", "").replace(".base_layer", ""): tensor
        for name, tensor in model.state_dict().items()
        if not _adapter_tensor().search(name)
    }


def touches_base(plan: Plan) -> bool:
    """The adapter rewrote (PiSSA, OLoRA) or trains (bias) base tensors: disabling or unloading it
    does not give the original base model back, in peft as in peftc."""
    return bool(plan.unfrozen) or methods.get(plan.method).rewrites_base(plan.spec.peft)
