"""The compatibility table: method x task x quantization x model family x strategy.

One declarative list of refusals, each with the key to blame, the reason and what would work.
The spec stage checks the rules that need no model; the planner checks the rest against the
model graph. Methods, tasks and backends add their rows here, not scattered validators.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlparse

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


# ----------------------------------------------------------------- what this machine can run
# Lightning checks these only when it builds the Trainer, after plan.json is written; they are
# read here from torch and the installed packages, without importing Lightning.


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()  # NVML count: does not initialise CUDA


def _mps_available() -> bool:
    import torch

    return torch.backends.mps.is_available()


def accelerator_here(accelerator: str) -> str:
    """The accelerator Lightning would pick for this name on this machine ('none': not available)."""
    if accelerator == "auto":  # Lightning's order: tpu, mps, cuda, cpu
        if not _missing("torch_xla"):
            return "tpu"
        return "mps" if _mps_available() else "cuda" if cuda_device_count() else "cpu"
    if accelerator == "gpu":
        return "mps" if _mps_available() else "cuda" if cuda_device_count() else "none"
    available = {
        "cpu": True,
        "cuda": cuda_device_count() > 0,
        "mps": _mps_available(),
        "tpu": not _missing("torch_xla"),
    }
    return accelerator if available.get(accelerator, False) else "none"


def _accelerator_missing(*names: str) -> Callable[[Context], bool]:
    return lambda ctx: ctx.run.trainer.accelerator in names and accelerator_here(ctx.run.trainer.accelerator) == "none"


def _cpu_devices_not_a_count(ctx: Context) -> bool:
    """On CPU, Lightning's devices is a number of processes: a list of ids or -1 is refused."""
    devices = ctx.run.trainer.devices
    if accelerator_here(ctx.run.trainer.accelerator) != "cpu" or devices == "auto":
        return False
    return not (isinstance(devices, int) and devices >= 1) and not (isinstance(devices, str) and devices.isdigit())


def requested_devices(devices: object) -> tuple[int, int] | None:
    """(how many devices, the highest id + 1) that a `devices` value asks for; None: all/auto."""
    if isinstance(devices, str):
        if devices.strip() in ("auto", "-1"):
            return None
        ids = [int(part) for part in devices.split(",") if part.strip()]
        return (ids[0], ids[0]) if len(ids) == 1 else (len(ids), max(ids) + 1)
    if isinstance(devices, int):
        return None if devices == -1 else (devices, devices)
    ids = [int(i) for i in devices]
    return len(ids), max(ids) + 1


def _too_few_gpus(ctx: Context) -> bool:
    wanted = requested_devices(ctx.run.trainer.devices)
    if wanted is None or accelerator_here(ctx.run.trainer.accelerator) != "cuda":
        return False
    return max(wanted) > cuda_device_count()


def _gpus_here() -> str:
    count = cuda_device_count()
    return f"this machine has {count} CUDA device{'s' if count != 1 else ''}"


def _fp16_amp_on_cpu(ctx: Context) -> bool:
    return ctx.run.trainer.precision_name == "16-mixed" and accelerator_here(ctx.run.trainer.accelerator) == "cpu"


def _transformer_engine_missing(ctx: Context) -> bool:
    return ctx.run.trainer.precision_name.startswith("transformer-engine") and _missing("transformer_engine")


def _tensorboard_missing(ctx: Context) -> bool:
    """Lightning's TensorBoardLogger writes through tensorboard or tensorboardX."""
    return ctx.run.trainer.logger == "tensorboard" and _missing("tensorboard") and _missing("tensorboardX")


def _tracker_missing(logger: str, module: str) -> Callable[[Context], bool]:
    return lambda ctx: ctx.run.trainer.logger == logger and _missing(module)


def _wandb_without_login(ctx: Context) -> bool:
    """wandb.init fails mid-run (after the model is built) without a login unless it logs offline."""
    if ctx.run.trainer.logger != "wandb" or _missing("wandb"):
        return False
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled") or os.environ.get("WANDB_API_KEY"):
        return False
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is None  # where `wandb login` keeps the key
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def _sacrebleu_missing(ctx: Context) -> bool:
    return bool(getattr(ctx.run.task, "eval_with_generate", False)) and _missing("sacrebleu")


def _datasets_missing(ctx: Context) -> bool:
    return ctx.run.data.source == "hf" and _missing("datasets")


ENVIRONMENT_RULES: list[Rule] = [
    Rule(
        key="task.eval_with_generate",
        reason="BLEU is sacreBLEU's, and the sacrebleu package is not installed",
        suggestion="pip install 'peftc[metrics]', or leave task.eval_with_generate=false",
        when=_sacrebleu_missing,
    ),
    Rule(
        key="data.source",
        reason="source=hf reads through Hugging Face's datasets package, which is not installed",
        suggestion="pip install 'peftc[datasets]', or use data.source=jsonl|csv",
        when=_datasets_missing,
    ),
    Rule(
        key="data.format",
        reason="is read by task=causal_lm only (the other tasks have their own fields)",
        suggestion="leave data.format=text, or use task=causal_lm",
        task=frozenset({"seq2seq_lm", "seq_cls", "token_cls", "question_ans", "feature_extraction"}),
        when=lambda ctx: ctx.run.data.format != "text",
    ),
    Rule(
        key="trainer.accelerator",
        reason="no CUDA GPU is visible on this machine (torch.cuda.device_count() is 0)",
        suggestion="use trainer=cpu here (or trainer.accelerator=auto: the best one found), or run where a GPU is",
        when=_accelerator_missing("gpu", "cuda"),
    ),
    Rule(
        key="trainer.accelerator",
        reason="TPUs need the torch_xla package, which is not installed",
        suggestion="use trainer.accelerator=cpu, gpu or auto, or install torch_xla on a TPU machine",
        when=_accelerator_missing("tpu"),
    ),
    Rule(
        key="trainer.accelerator",
        reason="Apple's MPS backend is not available on this machine",
        suggestion="use trainer.accelerator=cpu, or auto to take the best one found",
        when=_accelerator_missing("mps"),
    ),
    Rule(
        key="trainer.devices",
        reason="on CPU, devices is a number of processes, and Lightning refuses a list of ids or -1 there",
        suggestion="give a count such as trainer.devices=2",
        when=_cpu_devices_not_a_count,
    ),
    Rule(
        key="trainer.devices",
        reason="asks for more CUDA devices than this machine has",
        suggestion="lower trainer.devices, list existing ids (e.g. [0]), or use trainer.devices=-1 for all",
        when=_too_few_gpus,
    ),
    Rule(
        key="trainer.precision",
        reason="fp16 mixed precision does not run on CPU (Lightning would switch to bf16-mixed without asking)",
        suggestion="use trainer.precision=bf16-mixed on CPU, or 16-mixed with trainer.accelerator=gpu",
        when=_fp16_amp_on_cpu,
    ),
    Rule(
        key="trainer.precision",
        reason="needs NVIDIA's transformer_engine package, which is not installed",
        suggestion="pip install transformer_engine (CUDA GPUs only), or use trainer.precision=bf16-mixed",
        when=_transformer_engine_missing,
    ),
    Rule(
        key="trainer.logger",
        reason="the tensorboard logger needs the tensorboard package, which is not installed",
        suggestion="pip install 'peftc[tensorboard]', or use trainer.logger=csv",
        when=_tensorboard_missing,
    ),
    Rule(
        key="trainer.logger",
        reason="the wandb logger needs the wandb package, which is not installed",
        suggestion="pip install 'peftc[wandb]', or use trainer.logger=csv",
        when=_tracker_missing("wandb", "wandb"),
    ),
    Rule(
        key="trainer.logger",
        reason="wandb has no login here (no WANDB_API_KEY, no `wandb login` entry in ~/.netrc)",
        suggestion="run `wandb login`, set WANDB_API_KEY, or set WANDB_MODE=offline to log locally (wandb sync later)",
        when=_wandb_without_login,
    ),
    Rule(
        key="trainer.logger",
        reason="the mlflow logger needs the mlflow package, which is not installed",
        suggestion="pip install 'peftc[mlflow]', or use trainer.logger=csv",
        when=_tracker_missing("mlflow", "mlflow"),
    ),
]


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
    *ENVIRONMENT_RULES,
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


def check_spec(run: RunSpec) -> None:
    """The refusals that need no model graph, for a spec alone (the CLI runs them before Hydra
    starts a job, so a run that cannot work here leaves nothing behind)."""
    from peftc.config.registry import METHODS, QUANT_BACKENDS, TASKS

    names = (METHODS.for_spec(run.peft).name, TASKS.for_spec(run.task).name, QUANT_BACKENDS.for_spec(run.quant).name)
    check(Context(*names, run.trainer.strategy, run))


def check(ctx: Context) -> None:
    """Raise the first refusal that applies (spec-level rules when ctx.graph is None)."""
    for rule in RULES:
        if rule.applies(ctx):
            value = _value(ctx, rule.key)
            suggestion = rule.suggestion
            if rule.key == "trainer.strategy" and ctx.strategy not in STRATEGIES:
                suggestion = did_you_mean(ctx.strategy, STRATEGIES) or suggestion
            if rule.when is _too_few_gpus:
                suggestion = f"{_gpus_here()}; {suggestion}"
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
    if isinstance(node, tuple):  # sealed specs hold lists as tuples; show what the user wrote
        return list(node)
    return None if hasattr(node, "__dataclass_fields__") else node
