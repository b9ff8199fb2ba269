"""The compatibility table: method x task x quantization x model family x strategy.

One declarative list of refusals, each with the key to blame, the reason and what would work.
The spec stage checks the rules that need no model; the planner checks the rest against the
model graph. Methods, tasks and backends add their rows here, not scattered validators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftc.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from peftc.config.spec import RunSpec
    from peftc.planning.graph import ModelGraph


@dataclass(frozen=True)
class Context:
    method: str
    task: str
    quant: str
    strategy: str
    run: RunSpec
    graph: ModelGraph | None = None

    @property
    def family(self) -> str | None:
        return self.graph.model_type if self.graph is not None else None


@dataclass(frozen=True)
class Rule:
    key: str
    reason: str
    suggestion: str
    method: frozenset[str] | None = None  # None: any
    task: frozenset[str] | None = None
    quant: frozenset[str] | None = None
    strategy: frozenset[str] | None = None
    needs_graph: bool = False
    when: Callable[[Context], bool] | None = None

    def applies(self, ctx: Context) -> bool:
        for wanted, actual in (
            (self.method, ctx.method),
            (self.task, ctx.task),
            (self.quant, ctx.quant),
            (self.strategy, ctx.strategy),
        ):
            if wanted is not None and actual not in wanted:
                return False
        if self.needs_graph and ctx.graph is None:
            return False
        return self.when is None or self.when(ctx)


def _set(*names: str) -> frozenset[str]:
    return frozenset(names)


def _head_missing(ctx: Context) -> bool:
    """The task has a head peft keeps trainable, but the model built for it has none of those
    names (e.g. T5ForSequenceClassification's classification_head) and the user named none."""
    from peftc.config.registry import TASKS

    heads = TASKS.get(ctx.task).head_modules
    if not heads or any(ctx.graph.module(h) is not None for h in heads):
        return False
    return not getattr(ctx.run.peft, "modules_to_save", None)


def _method_cannot_wrap_quantized(ctx: Context) -> bool:
    from peftc.config.registry import METHODS

    method = METHODS.get(ctx.method)  # prompt methods wrap no base layer: any quantization works
    return ctx.quant != "none" and method.kind == "injectable" and not method.wraps_quantized


VIRTUAL_TOKEN_METHODS = _set("prompt_tuning", "p_tuning", "multitask_prompt_tuning")
ADAPTION_PROMPT_FAMILIES = ("llama", "mistral", "gpt2")


# Lightning 2.6's registered strategy names (a test keeps this list in step with Lightning).
STRATEGIES = (
    "auto",
    "ddp",
    "ddp_find_unused_parameters_false",
    "ddp_find_unused_parameters_true",
    "ddp_fork",
    "ddp_notebook",
    "ddp_spawn",
    "deepspeed",
    "deepspeed_stage_1",
    "deepspeed_stage_2",
    "deepspeed_stage_2_offload",
    "deepspeed_stage_3",
    "deepspeed_stage_3_offload",
    "deepspeed_stage_3_offload_nvme",
    "fsdp",
    "fsdp_cpu_offload",
    "single_device",
    "xla",
)


def _on_cpu(ctx: Context) -> bool:
    return ctx.run.trainer.accelerator == "cpu"


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def _init_rewrites_quantized_base(ctx: Context) -> bool:
    from peftc.config.registry import METHODS

    return ctx.quant != "none" and METHODS.get(ctx.method).rewrites_base(ctx.run.peft)


RULES: list[Rule] = [
    Rule(
        key="trainer.strategy",
        reason="is not a Lightning strategy",
        suggestion="known: " + ", ".join(STRATEGIES),
        when=lambda ctx: ctx.strategy not in STRATEGIES,
    ),
    Rule(
        key="trainer.strategy",
        reason="Lightning's FSDP strategy requires a GPU accelerator (trainer.accelerator=cpu here)",
        suggestion="use trainer=ddp_cpu (DDP, gloo) on CPU, or trainer.accelerator=gpu for FSDP",
        when=lambda ctx: ctx.strategy.startswith("fsdp") and _on_cpu(ctx),
    ),
    Rule(
        key="trainer.strategy",
        reason="the DeepSpeed strategy needs the deepspeed package, which is not installed",
        suggestion="pip install deepspeed (CUDA GPUs only), or use trainer.strategy=ddp",
        when=lambda ctx: ctx.strategy.startswith("deepspeed") and _missing("deepspeed"),
    ),
    Rule(
        key="trainer.strategy",
        reason="Lightning's DeepSpeed strategy runs only on CUDA GPUs (trainer.accelerator=cpu here)",
        suggestion="use trainer=ddp_cpu on CPU, or trainer.accelerator=gpu with DeepSpeed",
        when=lambda ctx: ctx.strategy.startswith("deepspeed") and _on_cpu(ctx),
    ),
    Rule(
        key="quant",
        reason="the chosen peft method's layer has not been made to wrap quantized layers "
        "(its forward or merge reads the base weight directly)",
        suggestion="use quant=none, or a method that wraps quantized layers (peft=lora)",
        when=_method_cannot_wrap_quantized,
    ),
    Rule(
        key="peft.init_lora_weights",
        reason="PiSSA/OLoRA initialisation rewrites the base weight as the residual W - s B A; a quantized "
        "base would quantize that residual again, so the adapter would not start from the model's own weights",
        suggestion="use quant=none with this initialisation, or the default init_lora_weights=true on a quantized base",
        method=_set("lora"),
        when=_init_rewrites_quantized_base,
    ),
    Rule(
        key="model",
        reason="causal_lm trains a decoder-only model, but this model is encoder-decoder",
        suggestion="use task=seq2seq_lm, or a decoder model such as model=tiny_llama",
        task=_set("causal_lm"),
        needs_graph=True,
        when=lambda ctx: ctx.graph.facts.is_encoder_decoder,
    ),
    Rule(
        key="model",
        reason="feature_extraction pools the outputs of an encoder or decoder stack; an encoder-decoder model has no single one",
        suggestion="use an encoder such as model=minilm or model=tiny_bert",
        task=_set("feature_extraction"),
        needs_graph=True,
        when=lambda ctx: ctx.graph.facts.is_encoder_decoder,
    ),
    Rule(
        key="model",
        reason="the task head of this model is not one peft keeps trainable (classifier, score, qa_outputs), so it would stay at its random initialisation",
        suggestion="name the head in peft.modules_to_save, or use a model whose head is one of those",
        task=_set("seq_cls", "token_cls", "question_ans"),
        needs_graph=True,
        when=_head_missing,
    ),
    Rule(
        key="model",
        reason="adaption_prompt (LLaMA-Adapter) wraps Llama/Mistral- or GPT-2-style attention layers, and this model's are neither",
        suggestion="use prefix_tuning or prompt_tuning here, or a llama, mistral or gpt2 model",
        method=_set("adaption_prompt"),
        needs_graph=True,
        when=lambda ctx: ctx.family not in ADAPTION_PROMPT_FAMILIES,
    ),
    Rule(
        key="trainer.gradient_checkpointing",
        reason="prefix_tuning hands the model its prefix as a key/value cache, and the recomputation pass of gradient checkpointing would append to that cache a second time (peft refuses this too)",
        suggestion="set trainer.gradient_checkpointing=false, or use prompt_tuning / lora",
        method=_set("prefix_tuning"),
        when=lambda ctx: ctx.run.trainer.gradient_checkpointing,
    ),
    Rule(
        key="task",
        reason="virtual tokens lengthen the input, so this task's per-token outputs would no longer line up with its labels",
        suggestion="use prefix_tuning (keeps the sequence length) or lora",
        method=VIRTUAL_TOKEN_METHODS,
        task=_set("token_cls", "question_ans", "feature_extraction"),
    ),
    Rule(
        key="resume",
        reason="AdaLoRA's rank allocator keeps importance scores outside the checkpoint, so a resumed run would prune different ranks than an uninterrupted one",
        suggestion="restart the AdaLoRA run without resume",
        method=_set("adalora"),
        when=lambda ctx: getattr(ctx.run, "resume", None) is not None,
    ),
]


# Refusals found before any graph exists: transformers has no model class with this task's head
# for the model type (e.g. AutoModelForSeq2SeqLM for a Llama). What to use instead, per head class:
HEAD_SUGGESTIONS = {
    "AutoModelForSeq2SeqLM": "task=seq2seq_lm needs an encoder-decoder model such as model=tiny_t5",
    "AutoModelForCausalLM": "task=causal_lm needs a decoder model such as model=tiny_llama or model=tiny_gpt2",
    "AutoModelForSequenceClassification": "use an encoder (model=tiny_bert, model=minilm) or a decoder (model=tiny_llama)",
    "AutoModelForTokenClassification": "use an encoder such as model=tiny_bert or model=minilm",
    "AutoModelForQuestionAnswering": "use an encoder such as model=tiny_bert or model=minilm",
    "AutoModel": "use an encoder such as model=minilm or model=tiny_bert",
}


def unsupported_head(model_type: str, auto_class_name: str) -> ConfigError:
    return ConfigError(
        "model",
        model_type,
        f"transformers has no {auto_class_name} class for this model type (the task's head)",
        HEAD_SUGGESTIONS.get(auto_class_name, "pick a model type that has this head"),
    )


def check(ctx: Context) -> None:
    """Raise the first refusal that applies (spec-level rules when ctx.graph is None)."""
    for rule in RULES:
        if rule.applies(ctx):
            value = _value(ctx, rule.key)
            suggestion = rule.suggestion
            if rule.key == "trainer.strategy" and ctx.strategy not in STRATEGIES:
                suggestion = did_you_mean(ctx.strategy, STRATEGIES) or suggestion
            raise ConfigError(rule.key, value, rule.reason, suggestion)


def _value(ctx: Context, key: str) -> object:
    """The value a refusal blames: the chosen option for a group key ('model' shows the model
    family), else the setting at that key path of the run (e.g. trainer.gradient_checkpointing)."""
    groups = {"model": ctx.family, "peft": ctx.method, "task": ctx.task, "quant": ctx.quant, "trainer": ctx.strategy}
    if key in groups:
        return groups[key]
    node: object = ctx.run
    for part in key.split("."):
        node = getattr(node, part, None)
    return None if hasattr(node, "__dataclass_fields__") else node
