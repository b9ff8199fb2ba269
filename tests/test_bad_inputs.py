"""The bad-input catalogue: things users (or strangers' files) hand peftc.

Every case names the exception type and a message fragment, and proves nothing changed: the
world's models are bit-identical (tensors, structure, requires_grad, adapter bookkeeping), no
file under the world's directory appeared, vanished or changed (no partial files, no leftover
staging dirs, no pickle sentinel; the previous run's output dir is byte-identical), and after a
failed overwrite the previous adapter still loads with its exact tensors.
"""

from __future__ import annotations

import copy
import errno
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import peftc
from peftc.errors import AdapterFileError, ConfigError, DataError, PlanError
from tests.catalogue import (
    World,
    adapter_variant,
    assert_same_model,
    build_pristine,
    disk_full_while_writing_weights,
    edit_bytes,
    edit_config,
    edit_header,
    edit_tensors,
    failing,
    file_tree,
    make_world,
    model_state,
    write_pickle_adapter,
)
from tests.catalogue_acts import (
    cli,
    cli_entry,
    crash_between_renames,
    drop_peft_type,
    dup_offsets,
    duplicate_names,
    edit_model_config,
    fail_at_last_site,
    fake_checkpoint,
    first_tensor,
    load_into_base,
    load_into_model,
    model_dir,
    never_load_base,
    out_of_range,
    pickle_only,
    poison,
    prompt_adapter,
    save_over_previous,
    set_dtype,
    shape_lie,
    shape_undersized,
    user_config,
    with_cuda_devices,
    without_package,
    write_file,
    write_pickle,
)


@dataclass(frozen=True)
class Bad:
    id: str
    # override | yaml | code (code execution, secrets) | non_finite | environment | model_dir | dataset |
    # adapter_file | api | write | resume
    kind: str
    act: Callable[[World, Any], Any]
    error: type[BaseException]
    fragment: str
    setup: Callable[[World], Any] = lambda world: None


LORA_YAML = "defaults:\n  - /schema/peft/lora@_here_\n  - _self_\n"
# A Hydra callback that creates a file when Hydra instantiates it (proof that code ran).
GLOBAL_CALLBACK_YAML = "# @package _global_\nhydra:\n  callbacks:\n    x:\n" + "".join(
    f"      {line}\n" for line in ("_target_: builtins.open", "file: PWNED", "mode: w")
)
DECODED_ENV = "name: ${oc.decode:'\\${oc.${oc.decode:env}:HOME}'}\n"  # the name oc.env is built while resolving
NEVER = "never instantiates"
ENV = "environment variable"
GPU = "no CUDA GPU is visible"
STORY = '{"text": "Once upon a time there was a small robot who liked to count the stars."}\n'


def _write_header(path: Path, header: bytes) -> None:
    """A safetensors file whose header is these bytes (padded to 8) and no data."""
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header)


# One row per bad input: id, kind, what is done, the error type, a fragment of its message, and
# the setup that builds the bad input inside the world.
# fmt: off
CASES = [
    # --- command-line overrides -----------------------------------------------------------
    Bad("unknown-key", "override", cli("peft.rr=8"), ConfigError, "did you mean 'r'"),
    Bad("added-unknown-key", "override", cli("+peft.rr=8"), ConfigError, "did you mean 'r'"),
    Bad("a-bare-option", "override", cli("lora"), ConfigError, "override='lora': has no '='; did you mean peft=lora?"),
    Bad("a-key-split-from-its-value", "override", cli("peft.r", "8"), ConfigError,
        "override='peft.r': has no '='; give its value in the same argument: peft.r=<value>"),
    Bad("unclosed-list", "override", cli("peft.r=[1,2"), ConfigError, "cannot be parsed: no viable alternative at input"),
    Bad("a-dashed-override", "override", cli_entry("--peft=lora"), ConfigError,
        "argument='--peft=lora': is a flag; peftc takes Hydra overrides, without dashes; write peft=lora"),
    Bad("a-dashed-key-and-value", "override", cli_entry("--trainer.lr", "1e-4"), ConfigError, "write trainer.lr=1e-4"),
    Bad("option-in-capitals", "override", cli("peft=LoRA"), ConfigError, "did you mean 'lora'?"),
    Bad("qlora-as-a-method", "override", cli("peft=qlora"), ConfigError, "QLoRA is peft=lora with quant=bnb_nf4"),
    Bad("dora-as-a-method", "override", cli("peft=dora"), ConfigError, "DoRA is peft=lora with peft.use_dora=true"),
    Bad("quant-4bit", "override", cli("quant=4bit"), ConfigError, "4-bit is quant=bnb_nf4 (QLoRA's)"),
    Bad("rank-zero", "override", cli("peft.r=0"), ConfigError, "must be >= 1"),
    Bad("comma-in-a-single-run", "override", cli("peft.target_modules=q_proj,v_proj"), ConfigError,
        "single run; for a list write peft.target_modules=[q_proj,v_proj]; for one string quote it"),
    Bad("range-in-a-single-run", "override", cli("peft.r=range(4,9,4)"), ConfigError,
        "peft.r='range(4,9,4)': a sweep needs a multirun; add -m"),
    Bad("hydra-setting-swept", "override", cli_entry("-m", "hydra.job.name=a,b"), ConfigError,
        "hydra.job.name='a,b': Hydra's own settings cannot be swept; give it one value"),
    Bad("rank-text", "override", cli("peft.r=abc"), ConfigError, "expected int"),
    Bad("dropout-above-one", "override", cli("peft.lora_dropout=1.5"), ConfigError, "must be in [0.0, 1.0)"),
    Bad("alpha-negative", "override", cli("peft.lora_alpha=-1"), ConfigError, "must be > 0"),
    Bad("no-such-method", "override", cli("peft=lorra"), ConfigError, "did you mean 'lora'"),
    Bad("target-typo", "override", cli("peft.target_modules=[q_prj]"), PlanError, "did you mean 'q_proj'"),
    Bad("target-empty-list", "override", cli("peft.target_modules=[]"), ConfigError, "is empty"),
    Bad("target-bad-regex", "override", cli("peft.target_modules='(q_proj'"), ConfigError, "not a valid regular"),
    Bad("target-a-number", "override", cli("peft.target_modules=5"), ConfigError, "must be a list of module names"),
    Bad("target-a-norm", "override", cli("peft.target_modules=[norm]"), PlanError, "which lora cannot adapt"),
    Bad("layer-out-of-range", "override", cli("peft.layers_to_transform=[7]"), PlanError, "no such layer"),
    Bad("exclude-typo", "override", cli("peft.exclude_modules=[o_prj]"), PlanError, "excludes nothing"),
    Bad("modules-to-save-typo", "override", cli("peft.modules_to_save=[lm_haed]"), PlanError, "did you mean"),
    # Trainable tokens: rows of an embedding, named clearly when they cannot be
    Bad("tokens-outside-the-vocabulary", "override", cli("peft.trainable_token_indices=[300]"), PlanError,
        "token ids [300] are outside model.embed_tokens's 260 rows"),
    Bad("tokens-on-a-linear", "override", cli("peft.trainable_token_indices={q_proj: [1]}"), PlanError,
        "trainable tokens are rows of an nn.Embedding"),
    Bad("tokens-module-typo", "override", cli("peft.trainable_token_indices={embed_tokns: [1]}"), PlanError,
        "did you mean 'embed_tokens'"),
    Bad("tokens-empty", "override", cli("peft.trainable_token_indices=[]"), ConfigError, "non-empty list of token ids"),
    Bad("tokens-twice", "override", cli("peft.trainable_token_indices=[1,1]"), ConfigError, "lists a token id twice"),
    Bad("tokens-and-whole-embedding", "override",
        cli("peft.trainable_token_indices=[1]", "peft.modules_to_save=[embed_tokens]"), PlanError, "peft refuses both"),
    Bad("tokens-on-a-tied-head-apart", "override",
        cli("model=tiny_gpt2", "peft.trainable_token_indices={wte: [5], lm_head: [6]}"), PlanError,
        "name only the embedding: peft.trainable_token_indices={wte: [6]}"),
    Bad("merge-without-adapter", "override", cli("action=merge"), ConfigError, "action=merge needs the adapter to merge"),
    Bad("export-without-adapter", "override", cli("action=export"), ConfigError, "give adapter=RUN/adapter"),
    Bad("huge-rank", "override", never_load_base(cli("peft.r=1000000000")), PlanError, "more than this machine"),
    # Values nested past what Hydra's and OmegaConf's parsers can follow (a RecursionError before).
    Bad("override-list-nested-3000", "override", cli("trainer.max_steps=1", "peft.target_modules=" + "[" * 3000 + "]" * 3000), ConfigError,
        "peft.target_modules: is nested too deeply to parse"),
    Bad("override-mapping-nested-3000", "override", cli("+model.config.x=" + "{a:" * 3000 + "1" + "}" * 3000),
        ConfigError, "is nested too deeply to parse"),
    # Output directories a run could not write: refused before anything loads.
    Bad("output-dir-is-a-file", "write", cli("trainer.max_steps=1", "output_dir={input}"), ConfigError,
        "is a file, not a directory", write_file("notadir", "x")),
    # root passes every permission check; /proc takes no new directory all the same
    Bad("output-dir-on-a-pseudo-filesystem", "write", never_load_base(cli("trainer.max_steps=1", "output_dir=/proc/peftc-run")),
        ConfigError, "output_dir='/proc/peftc-run': cannot be written (/proc is not writable)"),
    Bad("output-dir-name-too-long", "write", cli("trainer.max_steps=1", "output_dir=runs/" + "x" * 300), ConfigError,
        "the filesystem allows 255"),
    Bad("output-dir-name-too-long-in-bytes", "write", cli("trainer.max_steps=1", "output_dir='runs/" + "é" * 128 + "'"),
        ConfigError, "has a name of 256 bytes"),  # 128 characters, 2 bytes each
    Bad("save-adapter-onto-a-file", "api", lambda world, inp: world.model.save_adapter(inp), AdapterFileError,
        "is a file, not a directory", write_file("adapter_here", "notes")),
    # Absurd model sizes are refused from the config alone (building their meta graph grew without bound).
    Bad("absurd-layer-count", "override", cli("model=tiny_llama", "model.config.num_hidden_layers=1000000000", "dry_run=true"),
        ConfigError, "asks for more than 10,000 layers"),
    Bad("absurd-width", "override", cli("model=tiny_llama", "model.config.hidden_size=100000000", "dry_run=true"), ConfigError,
        "beyond any that can be trained"),
    Bad("max-steps-zero", "override", cli("trainer.max_steps=0"), ConfigError, "must be positive"),
    Bad("betas-one", "override", cli("trainer.betas=[0.9]"), ConfigError, "two numbers"),
    Bad("batch-size-zero", "override", cli("data.batch_size=0"), ConfigError, "must be >= 1"),
    Bad("precision-typo", "override", cli("trainer.precision=8-mixed"), ConfigError, "must be one of"),
    Bad("dtype-typo", "override", cli("model.dtype=float8"), ConfigError, "must be one of"),
    Bad("model-type-typo", "override", cli("model=tiny_llama", "model.model_type=lama"), ConfigError, "did you mean 'llama'"),
    Bad("override-syntax", "override", cli("peft.r=[4"), ConfigError, "cannot be parsed"),
    Bad("target-at-root", "override", cli("+_target_=os.system"), ConfigError, "never instantiates"),
    Bad("target-in-group", "override", cli("+peft._target_=os.system"), ConfigError, "never instantiates"),
    Bad("target-in-mapping", "override", cli("+model.config._target_=builtins.eval"), ConfigError, "never instantiates"),
    Bad("target-as-pattern", "override", cli("peft.rank_pattern={_target_: 2}"), ConfigError, "never instantiates"),
    Bad("env-interpolation", "override", cli("model.name=${oc.env:HOME}"), ConfigError, "environment variable"),
    Bad("remote-code-config", "override", cli("+model.config.trust_remote_code=true"), ConfigError, "run code"),
    Bad("adapter-name-dot", "override", cli("adapter_name=my.adapter"), ConfigError, "no dots"),
    Bad("adapter-name-empty", "override", cli("adapter_name=''"), ConfigError, "not a valid adapter name"),
    Bad("adapter-name-prefix", "override", cli("adapter_name=lora"), ConfigError, "is reserved"),
    Bad("adapter-name-module", "override", cli("adapter_name=mlp"), PlanError, "is also a module name"),
    Bad("model-hf-no-path", "override", cli("model=hf"), ConfigError, "no model given"),
    # options of methods and tasks added by other issues
    Bad("prompt-zero-tokens", "override", cli("peft=prompt_tuning", "peft.num_virtual_tokens=0"), ConfigError,
        "must be >= 1"),
    Bad("prompt-text-init-no-text", "override", cli("peft=prompt_tuning", "peft.prompt_tuning_init=TEXT"),
        ConfigError, "needs the text to start from"),
    Bad("prefix-with-checkpointing", "override", cli("peft=prefix_tuning", "trainer.gradient_checkpointing=true"),
        ConfigError, "would append to that cache"),
    Bad("loha-rank-zero", "override", cli("peft=loha", "peft.r=0"), ConfigError, "must be >= 1"),
    Bad("ia3-ff-not-targeted", "override",
        cli("peft=ia3", "peft.target_modules=[q_proj]", "peft.feedforward_modules=[down_proj]"), ConfigError,
        "must be a subset of the targets"),
    Bad("seq-cls-headless-model", "override", cli("task=seq_cls", "model=tiny_t5"), ConfigError,
        "would stay at its random initialisation"),
    Bad("quant-typo", "override", cli("quant=nf4"), ConfigError, "no such quant option; NF4 is quant=bnb_nf4"),
    Bad("quant-compute-dtype", "override", cli("quant=bnb_nf4", "quant.compute_dtype=float8"), ConfigError,
        "must be one of"),
    Bad("quant-unknown-option", "override", cli("quant=bnb_nf4", "quant.blocksize=7"), ConfigError, "unknown key"),
    Bad("quant-skip-typo", "override", cli("quant=bnb_nf4", "quant.skip_modules=[lm_haed]"), PlanError,
        "did you mean 'lm_head'"),
    Bad("quant-pissa", "override", cli("quant=bnb_int8", "peft.init_lora_weights=pissa"), ConfigError,
        "would quantize that residual again"),
    Bad("multitask-source-pickle", "override",
        cli("peft=multitask_prompt_tuning", "peft.prompt_tuning_init=EXACT_SOURCE_TASK",
            "peft.prompt_tuning_init_state_dict_path={input}"), ConfigError, "pickle files are never loaded",
        lambda world: (write_pickle_adapter(world.inputs, world.root / "SENTINEL"), world.inputs / "adapter_model.bin")[1]),
    Bad("multitask-source-corrupt", "override",
        cli("peft=multitask_prompt_tuning", "peft.prompt_tuning_init=EXACT_SOURCE_TASK",
            "peft.prompt_tuning_init_state_dict_path={input}"), ConfigError, "truncated",
        write_file("source.safetensors", b"garbage")),
    # --- YAML files in a user config directory (--config-dir) --------------------------------
    Bad("yaml-unknown-key", "yaml", cli("--config-dir", "{input}", "peft=mine"), ConfigError,
        "unknown key for peft (LoraSpec) [source: {input}/peft/mine.yaml]; did you mean 'r'?",
        user_config("peft", "mine", LORA_YAML + "rr: 4\n")),
    Bad("yaml-wrong-type", "yaml", cli("--config-dir", "{input}", "peft=mine"), ConfigError,
        "expected integer [source: {input}/peft/mine.yaml]",
        user_config("peft", "mine", LORA_YAML + "r: many\n")),
    Bad("yaml-rank-zero", "yaml", cli("--config-dir", "{input}", "peft=mine"), ConfigError,
        "peft.r=0: must be >= 1 [source: {input}/peft/mine.yaml]", user_config("peft", "mine", LORA_YAML + "r: 0\n")),
    Bad("yaml-init-trailing-newline", "yaml", cli("--config-dir", "{input}", "peft=mine"), ConfigError,
        "peft.init_lora_weights", user_config("peft", "mine", LORA_YAML + 'init_lora_weights: "pissa_niter_3\\n"\n')),
    Bad("yaml-target", "yaml", cli("--config-dir", "{input}", "peft=mine"), ConfigError, "never instantiates",
        user_config("peft", "mine", LORA_YAML + "_target_: os.system\n")),
    Bad("yaml-python-tag", "yaml", cli("--config-dir", "{input}", "peft=mine"), ConfigError, "Python-object YAML tag",
        user_config("peft", "mine", LORA_YAML + 'r: !!python/object/apply:os.system ["touch SENTINEL"]\n')),
    Bad("yaml-syntax", "yaml", cli("--config-dir", "{input}", "peft=mine"), ConfigError, "not valid YAML",
        user_config("peft", "mine", LORA_YAML + "r: [4\n")),
    Bad("yaml-bad-indent-names-the-line", "yaml", cli("--config-dir", "{input}", "peft=mine"), ConfigError,
        "mine.yaml:6: is not valid YAML: mapping values are not allowed here",  # line 6: '  bad: indent'
        user_config("peft", "mine", LORA_YAML + "r: 4\nlora_alpha: 8\n  bad: indent\n")),
    Bad("yaml-a-list", "yaml", cli("--config-dir", "{input}", "peft=mine"), ConfigError, "must be a mapping",
        user_config("peft", "mine", "- 4\n- 8\n")),
    Bad("yaml-env", "yaml", cli("--config-dir", "{input}", "model=mine"), ConfigError, "environment variable",
        user_config("model", "mine", "defaults:\n  - tiny_llama\n  - _self_\nname: ${oc.env:HOME}\n")),
    Bad("yaml-model-code", "yaml", cli("--config-dir", "{input}", "model=mine"), ConfigError, "never instantiates",
        user_config("model", "mine", "defaults:\n  - tiny_llama\n  - _self_\nconfig:\n  _target_: os.system\n")),
    # --- code execution and secrets: hydra.* settings, Hydra flags, built resolver names ------------
    Bad("hydra-callback-target", "code", cli_entry("dry_run=true", "+hydra.callbacks.x._target_=builtins.open",
        "+hydra.callbacks.x.file=PWNED", "+hydra.callbacks.x.mode=w"), ConfigError, NEVER),
    Bad("hydra-callback-target-as-mapping", "code",
        cli_entry("dry_run=true", "+hydra.callbacks.x={_target_: builtins.open, file: PWNED, mode: w}"), ConfigError,
        NEVER),
    Bad("hydra-callback-partial", "code", cli_entry("dry_run=true", "+hydra.callbacks.x._partial_=true"), ConfigError,
        NEVER),
    Bad("hydra-callback-args", "code", cli_entry("dry_run=true", "+hydra.callbacks.x._args_=[PWNED]"), ConfigError,
        NEVER),
    Bad("hydra-packaged-callback-retargeted", "code",
        cli_entry("dry_run=true", "hydra.callbacks.sweep_summary._target_=builtins.exec"), ConfigError, NEVER),
    Bad("hydra-launcher-retargeted", "code", cli_entry("dry_run=true", "hydra.launcher._target_=os.system"),
        ConfigError, NEVER),
    Bad("hydra-sweeper-retargeted", "code", cli_entry("dry_run=true", "hydra.sweeper._target_=builtins.exec"),
        ConfigError, NEVER),
    Bad("hydra-logging-handler-class", "code",
        cli_entry("dry_run=true", "hydra.job_logging.handlers.console.class=os.system"), ConfigError, NEVER),
    Bad("hydra-callback-in-user-yaml", "code", cli_entry("dry_run=true", "--config-dir", "{input}", "+experiment=evil"),
        ConfigError, "evil.yaml", user_config("experiment", "evil", GLOBAL_CALLBACK_YAML)),
    Bad("hydra-launcher-in-user-yaml", "code",
        cli_entry("dry_run=true", "--config-dir", "{input}", "hydra/launcher=evil"), ConfigError, NEVER,
        user_config("hydra/launcher", "evil", "_target_: os.system\n")),
    Bad("hydra-logging-factory-in-user-yaml", "code",
        cli_entry("dry_run=true", "--config-dir", "{input}", "hydra/job_logging=evil"), ConfigError, NEVER,
        user_config("hydra/job_logging", "evil", "version: 1\nformatters:\n  x:\n    '()': os.system\n")),
    # Search paths other than directories make Hydra import a module to look for configs.
    Bad("searchpath-pkg-override", "code", cli_entry("dry_run=true", "hydra.searchpath=[pkg://this]"), ConfigError,
        "import the Python module 'this'"),
    Bad("searchpath-pkg-force-add-in-api", "code", lambda world, inp: peftc.compile(["++hydra.searchpath=[pkg://this]"]),
        ConfigError, "import the Python module 'this'"),
    Bad("config-dir-pkg", "code", cli_entry("--config-dir", "pkg://this", "dry_run=true"), ConfigError,
        "import the Python module 'this'"),
    Bad("searchpath-structured-in-api", "code", lambda world, inp: peftc.compile(["hydra.searchpath=[structured://this]"]),
        ConfigError, "import the Python module 'this'"),
    Bad("searchpath-in-primary-yaml", "code",
        cli_entry("--config-dir", "{input}", "--config-name", "exp", "dry_run=true"), ConfigError,
        "exp.yaml: hydra.searchpath='pkg://this'",
        user_config("", "exp", "defaults:\n  - config\n  - _self_\nhydra:\n  searchpath: [pkg://this]\n")),
    Bad("hydra-callback-recursive", "code", cli_entry("dry_run=true", "+hydra.callbacks.x._recursive_=false"),
        ConfigError, NEVER),
    Bad("hydra-callback-preflight", "code", cli("+hydra.callbacks.x._target_=builtins.open"), ConfigError, NEVER),
    Bad("experimental-rerun-pickle", "code", cli_entry("--experimental-rerun", "{input}"), ConfigError,
        "never loads pickles", write_pickle),
    Bad("experimental-rerun-pickle-inline", "code", cli_entry("--experimental-rerun={input}"), ConfigError,
        "never loads pickles", write_pickle),
    Bad("env-in-hydra-run-dir", "code", cli_entry("dry_run=true", "hydra.run.dir='${oc.env:HOME}/run'"), ConfigError,
        ENV),
    Bad("launcher-setup-shell-commands", "code", cli_entry("dry_run=true", "+hydra.launcher.setup=['curl x | sh']"),
        ConfigError, "is a shell command the launcher would run"),
    Bad("env-in-hydra-help-template", "code", cli_entry("--hydra-help", "hydra.hydra_help.template='${oc.env:HOME}'"),
        ConfigError, ENV),
    Bad("env-in-hydra-job-name", "code", cli("hydra.job.name='${oc.env:HOME}'"), ConfigError, ENV),
    Bad("env-copied-by-hydra", "code", cli_entry("dry_run=true", "hydra.job.env_copy=[HOME]"), ConfigError,
        "copies an environment variable"),
    Bad("unknown-resolver-in-hydra", "code", cli("hydra.job.name='${peftc_nope:x}'"), ConfigError, "does not allow"),
    Bad("env-printed-by-cfg", "code", cli_entry("--cfg", "job", "--resolve", "model.name='${oc.env:HOME}'"),
        ConfigError, ENV),
    Bad("resolver-name-built-by-interpolation", "code", cli("model.name='${oc.${oc.decode:env}:HOME}'"), ConfigError,
        "builds a resolver name"),
    Bad("env-resolver-built-while-decoding", "code", cli("--config-dir", "{input}", "model=mine"), ConfigError, ENV,
        user_config("model", "mine", "defaults:\n  - tiny_llama\n  - _self_\n" + DECODED_ENV)),
    # --- non-finite numbers: refused for every float of every schema ---------------------------------
    Bad("lr-inf", "non_finite", cli("trainer.lr=inf"), ConfigError, "must be a finite number"),
    Bad("weight-decay-inf", "non_finite", cli("trainer.weight_decay=inf"), ConfigError, "must be a finite number"),
    Bad("grad-clip-inf", "non_finite", cli("trainer.gradient_clip_val=inf"), ConfigError, "must be a finite number"),
    Bad("val-check-interval-nan", "non_finite", cli("trainer.val_check_interval=nan"), ConfigError,
        "must be a finite number"),
    Bad("alpha-inf", "non_finite", cli("peft.lora_alpha=inf"), ConfigError, "must be a finite number"),
    Bad("alpha-pattern-inf", "non_finite", cli("peft.alpha_pattern={q_proj: inf}"), ConfigError,
        "peft.alpha_pattern.q_proj=inf"),
    Bad("adalora-orth-reg-inf", "non_finite", cli("peft=adalora", "peft.orth_reg_weight=inf"), ConfigError,
        "must be a finite number"),
    Bad("oft-eps-inf", "non_finite", cli("peft=oft", "peft.eps=inf"), ConfigError, "must be a finite number"),
    Bad("model-config-inf", "non_finite", cli("+model.config.rope_theta=inf"), ConfigError, "must be a finite number"),
    Bad("memory-budget-inf", "non_finite", cli("budget.memory_gb=inf"), ConfigError, "must be a finite number"),
    Bad("yaml-lr-inf", "non_finite", cli("--config-dir", "{input}", "trainer=mine"), ConfigError,
        "trainer.lr=inf", user_config("trainer", "mine", "defaults:\n  - cpu\n  - _self_\nlr: .inf\n")),
    # --- what this machine can run: Lightning's own checks, made at compile time --------------------
    Bad("accelerator-gpu-without-cuda", "environment", with_cuda_devices(0, cli("trainer.accelerator=gpu")),
        ConfigError, GPU),
    Bad("accelerator-cuda-without-cuda", "environment", with_cuda_devices(0, cli("trainer.accelerator=cuda")),
        ConfigError, GPU),
    Bad("accelerator-gpu-without-cuda-dry-run", "environment",
        with_cuda_devices(0, cli_entry("trainer.accelerator=gpu", "dry_run=true")), ConfigError, GPU),
    Bad("accelerator-tpu-without-xla", "environment", without_package("torch_xla", cli("trainer.accelerator=tpu")),
        ConfigError, "torch_xla"),
    Bad("accelerator-typo", "environment", cli("trainer.accelerator=gpuu"), ConfigError, "did you mean 'gpu'"),
    Bad("devices-text", "environment", cli("trainer.devices=abc"), ConfigError, "must be a device count"),
    Bad("devices-zero", "environment", cli("trainer.devices=0"), ConfigError, "must be a device count"),
    Bad("devices-ids-on-cpu", "environment", cli("trainer.devices=[0,1]"), ConfigError, "number of processes"),
    Bad("devices-more-gpus-than-here", "environment",
        with_cuda_devices(1, cli("trainer.accelerator=gpu", "trainer.devices=4")), ConfigError,
        "this machine has 1 CUDA device"),
    Bad("devices-gpu-id-not-here", "environment",
        with_cuda_devices(2, cli("trainer.accelerator=gpu", "trainer.devices=[3]")), ConfigError,
        "more CUDA devices than this machine has"),
    Bad("precision-fp16-amp-on-cpu", "environment", cli("trainer.precision=16-mixed"), ConfigError,
        "does not run on CPU"),
    Bad("precision-underscore", "environment", cli("trainer.precision=transformer_engine"), ConfigError,
        "did you mean 'transformer-engine'"),
    Bad("precision-transformer-engine-missing", "environment",
        without_package("transformer_engine", cli("trainer.precision=transformer-engine")), ConfigError,
        "transformer_engine package"),
    Bad("logger-package-missing", "environment",
        without_package("tensorboard,tensorboardX", cli("trainer.logger=tensorboard")), ConfigError,
        "pip install 'peftc[tensorboard]'"),
    Bad("seed-negative", "environment", cli("seed=-1"), ConfigError, "must be in [0, 4294967295]"),
    Bad("seed-above-numpy-range", "environment", cli("seed=4294967296"), ConfigError, "must be in [0, 4294967295]"),
    # --- model directories ---------------------------------------------------------------------
    Bad("model-dir-missing", "model_dir", cli("model=hf", "model.name_or_path=/no/such/model"), ConfigError,
        "no such directory"),
    Bad("model-dir-no-config", "model_dir", cli("model=hf", "model.name_or_path={input}"), ConfigError,
        "has no config.json", model_dir(lambda d: (d / "config.json").unlink())),
    Bad("model-config-not-json", "model_dir", cli("model=hf", "model.name_or_path={input}"), ConfigError,
        "config.json cannot be used", model_dir(lambda d: (d / "config.json").write_text("{nope"))),
    Bad("model-type-unknown", "model_dir", cli("model=hf", "model.name_or_path={input}"), ConfigError,
        "config.json cannot be used", model_dir(edit_model_config(model_type="llamaxx"))),
    Bad("model-custom-code", "model_dir", cli("model=hf", "model.name_or_path={input}"), ConfigError,
        "needs code shipped with the model",
        model_dir(edit_model_config(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig"}))),
    Bad("model-no-weights", "model_dir", cli("model=hf", "model.name_or_path={input}"), ConfigError,
        "cannot be loaded", model_dir(None, weights=False)),
    Bad("model-weights-truncated", "model_dir", cli("model=hf", "model.name_or_path={input}"), ConfigError,
        "the weights cannot be used",
        model_dir(lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:999]))),
    Bad("model-weights-other-shape", "model_dir", cli("model=hf", "model.name_or_path={input}"), ConfigError,
        "size mismatch", model_dir(edit_model_config(intermediate_size=96))),
    # --- datasets --------------------------------------------------------------------------------
    Bad("data-missing-file", "dataset", cli("data.source=jsonl", "data.path=/no/such.jsonl"), ConfigError,
        "no such file"),
    Bad("data-path-a-directory", "dataset", cli("data.source=jsonl", "data.path={input}"), ConfigError,
        "is a directory, not a file; give an existing JSONL or CSV file", lambda world: world.inputs),
    Bad("data-bad-json-line", "dataset", cli("data.source=jsonl", "data.path={input}"), DataError,
        "not valid JSON", write_file("d.jsonl", STORY * 20 + "{oops\n")),
    Bad("data-row-not-object", "dataset", cli("data.source=jsonl", "data.path={input}"), DataError,
        "expected a JSON object", write_file("d.jsonl", STORY * 20 + "[1, 2]\n")),
    Bad("data-missing-column", "dataset", cli("data.source=jsonl", "data.path={input}"), DataError,
        "missing column 'text'", write_file("d.jsonl", '{"body": "x"}\n' * 20)),
    Bad("data-empty-file", "dataset", cli("data.source=jsonl", "data.path={input}"), DataError, "has no rows",
        write_file("d.jsonl", "")),
    Bad("data-not-utf8", "dataset", cli("data.source=jsonl", "data.path={input}"), DataError, "not UTF-8",
        write_file("d.jsonl", b"\xff\xfe\x00garbage\x80\n")),
    Bad("data-csv-empty", "dataset", cli("data.source=csv", "data.path={input}"), DataError, "no header row",
        write_file("d.csv", "")),
    Bad("data-column-for-no-field", "dataset",
        cli("data.source=jsonl", "data.path={input}", "data.columns={label: body}"), ConfigError,
        "is not a field of this task", write_file("d.jsonl", STORY * 20)),
    # A list where text belongs: str() would have trained on "['a', 'b']".
    Bad("data-text-is-a-list", "dataset", cli("data.source=jsonl", "data.path={input}"), DataError,
        "d.jsonl row 21: 'text' is a list", write_file("d.jsonl", STORY * 20 + '{"text": ["Once", "upon"]}\n')),
    Bad("data-label-is-a-list", "dataset", cli("task=seq_cls", "data.source=jsonl", "data.path={input}"), DataError,
        "'label' is a list", write_file("d.jsonl", '{"text": "fine", "label": "good"}\n{"text": "bad", "label": "bad"}\n' * 10
                                        + '{"text": "so-so", "label": ["good", "bad"]}\n')),
    Bad("data-format-for-another-task", "dataset", cli("task=seq_cls", "data.format=prompt_response"), ConfigError,
        "is read by task=causal_lm only"),
    Bad("data-prompt-response-without-response", "dataset",
        cli("data.source=jsonl", "data.path={input}", "data.format=prompt_response"), DataError,
        "d.jsonl row 1: missing column 'response'", write_file("d.jsonl", '{"prompt": "Q?", "answer": "A."}\n' * 20)),
    Bad("data-format-typo", "dataset", cli("data.format=prompt_reponse"), ConfigError, "did you mean 'prompt_response'"),
    Bad("data-too-few-rows", "dataset", cli("data.source=jsonl", "data.path={input}", "data.val_fraction=0.5"),
        DataError, "cannot be split", write_file("d.jsonl", STORY)),
    Bad("data-unknown-label", "dataset", cli("task=seq_cls", "task.labels=[negative,positive]", "data.source=jsonl", "data.path={input}"),
        DataError, "is not in the label set", write_file("d.jsonl", '{"text": "fine", "label": "maybe"}\n' * 30)),
    Bad("data-too-short-for-a-block", "dataset", cli("data.source=jsonl", "data.path={input}", "data.max_length=512"),
        DataError, "cannot fill one block", write_file("d.jsonl", STORY * 3)),
    # --- adapter directories and their files --------------------------------------------------------
    Bad("adapter-dir-missing", "adapter_file", load_into_model(), AdapterFileError, "no such adapter directory",
        lambda world: world.inputs / "nothing"),
    Bad("adapter-config-missing", "adapter_file", load_into_model(), AdapterFileError, "adapter_config.json: missing",
        adapter_variant(lambda d: (d / "adapter_config.json").unlink())),
    Bad("adapter-config-not-json", "adapter_file", load_into_model(), AdapterFileError, "not valid JSON",
        adapter_variant(lambda d: (d / "adapter_config.json").write_text("{"))),
    Bad("adapter-config-a-list", "adapter_file", load_into_model(), AdapterFileError, "must hold a JSON object",
        adapter_variant(lambda d: (d / "adapter_config.json").write_text("[]"))),
    Bad("adapter-config-nested-100k", "adapter_file", load_into_model(), AdapterFileError, "JSON nested too deeply",
        adapter_variant(lambda d: (d / "adapter_config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"))),
    Bad("safetensors-header-nested-100k", "adapter_file", load_into_model(), AdapterFileError, "nested too deeply",
        adapter_variant(lambda d: _write_header(d / "adapter_model.safetensors", b"[" * 100_000 + b"]" * 100_000))),
    Bad("adapter-config-not-utf8", "adapter_file", load_into_model(), AdapterFileError, "is not UTF-8 text",
        adapter_variant(lambda d: (d / "adapter_config.json").write_bytes(b'{"peft_type": "LORA\xff"}'))),
    Bad("peftc-plan-not-utf8", "adapter_file", load_into_model(), AdapterFileError, "peftc_plan.json: is not UTF-8",
        adapter_variant(lambda d: (d / "peftc_plan.json").write_bytes(b'{"format": 1, "x": "\xfe"}'))),
    Bad("peftc-plan-a-list", "adapter_file", load_into_model(), AdapterFileError, "must hold a JSON object, not a list",
        adapter_variant(lambda d: (d / "peftc_plan.json").write_text("[1, 2]"))),
    Bad("adapter-no-peft-type", "adapter_file", load_into_model(), AdapterFileError, "has no 'peft_type'",
        adapter_variant(drop_peft_type)),
    Bad("adapter-unknown-peft-type", "adapter_file", load_into_model(), AdapterFileError, "did you mean 'LORA'",
        adapter_variant(edit_config(peft_type="LORAX"))),
    Bad("adapter-trust-remote-code", "adapter_file", load_into_model(), AdapterFileError, "run code",
        adapter_variant(edit_config(trust_remote_code=True))),
    Bad("adapter-tokenizer-kwargs", "adapter_file", load_into_model(), AdapterFileError, "passes keyword arguments",
        adapter_variant(edit_config(tokenizer_kwargs={"trust_remote_code": True}))),
    Bad("adapter-nested-target", "adapter_file", load_into_model(), AdapterFileError, "never instantiates",
        adapter_variant(edit_config(rank_pattern={"_target_": "os.system"}))),
    Bad("adapter-url-base", "adapter_file", load_into_base, AdapterFileError, "is a URL",
        adapter_variant(edit_config(base_model_name_or_path="https://evil.example/model"))),
    Bad("adapter-rank-text", "adapter_file", load_into_model(), AdapterFileError, "wrong type",
        adapter_variant(edit_config(r="eight"))),
    Bad("adapter-rank-zero", "adapter_file", load_into_model(), AdapterFileError, "must be >= 1",
        adapter_variant(edit_config(r=0))),
    Bad("adapter-rank-huge", "adapter_file", load_into_model(), AdapterFileError, "1000000000",
        adapter_variant(edit_config(r=10**9))),
    Bad("adapter-dropout-two", "adapter_file", load_into_model(), AdapterFileError, "must be in [0.0, 1.0)",
        adapter_variant(edit_config(lora_dropout=2.0))),
    Bad("adapter-targets-a-number", "adapter_file", load_into_model(), ConfigError, "must be a list of module names",
        adapter_variant(edit_config(target_modules=5))),
    Bad("adapter-claims-dora", "adapter_file", load_into_model(), AdapterFileError, "are missing",
        adapter_variant(edit_config(use_dora=True))),
    Bad("adapter-unsupported-feature", "adapter_file", load_into_model(), AdapterFileError,
        "peftc does not implement", adapter_variant(edit_config(use_qalora=True))),
    Bad("adapter-pickle-only", "adapter_file", load_into_model(), AdapterFileError, "pickle adapter files are never",
        pickle_only),
    Bad("adapter-weights-missing", "adapter_file", load_into_model(), AdapterFileError, "safetensors: missing",
        adapter_variant(lambda d: (d / "adapter_model.safetensors").unlink())),
    Bad("st-empty", "adapter_file", load_into_model(), AdapterFileError, "truncated",
        adapter_variant(edit_bytes(lambda b: b""))),
    Bad("st-truncated-in-header", "adapter_file", load_into_model(), AdapterFileError, "header claims",
        adapter_variant(edit_bytes(lambda b: b[:40]))),
    Bad("st-truncated-in-data", "adapter_file", load_into_model(), AdapterFileError, "outside the",
        adapter_variant(edit_bytes(lambda b: b[: len(b) // 3]))),
    Bad("st-last-bytes-lost", "adapter_file", load_into_model(), AdapterFileError, "outside the",
        adapter_variant(edit_bytes(lambda b: b[:-100]))),
    Bad("st-header-over-cap", "adapter_file", load_into_model(), AdapterFileError, "more than safetensors allows",
        adapter_variant(edit_bytes(lambda b: (200_000_000).to_bytes(8, "little") + b[8:]))),
    Bad("st-header-not-json", "adapter_file", load_into_model(), AdapterFileError, "header is not valid JSON",
        adapter_variant(edit_bytes(lambda b: b[:8] + b"{" * 16 + b[24:]))),
    Bad("st-duplicate-names", "adapter_file", load_into_model(), AdapterFileError, "twice",
        adapter_variant(duplicate_names)),
    Bad("st-overlapping-offsets", "adapter_file", load_into_model(), AdapterFileError, "overlaps",
        adapter_variant(edit_header(dup_offsets))),
    Bad("st-out-of-range-offsets", "adapter_file", load_into_model(), AdapterFileError, "outside the",
        adapter_variant(edit_header(out_of_range))),
    Bad("st-shape-lies-about-size", "adapter_file", load_into_model(), AdapterFileError, "needs",
        adapter_variant(edit_header(shape_lie))),
    Bad("st-shape-smaller-than-its-bytes", "adapter_file", load_into_model(), AdapterFileError, "needs",
        adapter_variant(edit_header(shape_undersized))),
    Bad("st-unknown-dtype", "adapter_file", load_into_model(), AdapterFileError, "unknown dtype",
        adapter_variant(edit_header(set_dtype("F99")))),
    Bad("st-integer-dtype", "adapter_file", load_into_model(), AdapterFileError, "adapter tensors are floating point",
        adapter_variant(edit_header(set_dtype("I32")))),
    Bad("st-trailing-bytes", "adapter_file", load_into_model(), AdapterFileError, "after the last tensor",
        adapter_variant(edit_bytes(lambda b: b + b"\0" * 64))),
    Bad("tensor-nan", "adapter_file", load_into_model(), AdapterFileError, "NaN or Inf",
        adapter_variant(edit_tensors(poison(math.nan)))),
    Bad("tensor-inf", "adapter_file", load_into_model(), AdapterFileError, "NaN or Inf",
        adapter_variant(edit_tensors(poison(math.inf)))),
    Bad("tensor-missing", "adapter_file", load_into_model(), AdapterFileError, "are missing",
        adapter_variant(edit_tensors(lambda t: t.pop(first_tensor(t))))),
    Bad("tensor-unexpected", "adapter_file", load_into_model(), AdapterFileError, "do not belong",
        adapter_variant(edit_tensors(lambda t: t.update({"base_model.model.x.lora_A.weight": torch.zeros(2)})))),
    Bad("tensor-mis-shaped", "adapter_file", load_into_model(), AdapterFileError, "has shape",
        adapter_variant(edit_tensors(lambda t: t.update({first_tensor(t): torch.zeros(3, 3)})))),
    # --- a training run continuing a saved adapter (adapter= without action=): refused before the base loads
    Bad("continue-from-a-tensor-short-adapter", "adapter_file", never_load_base(cli("adapter={input}")),
        AdapterFileError, "are missing", adapter_variant(edit_tensors(lambda t: t.pop(first_tensor(t))))),
    Bad("continue-from-a-mis-shaped-adapter", "adapter_file", never_load_base(cli("adapter={input}")),
        AdapterFileError, "has shape", adapter_variant(edit_tensors(lambda t: t.update({first_tensor(t): torch.zeros(3, 3)})))),
    Bad("continue-from-a-rank-zero-config", "adapter_file", never_load_base(cli("adapter={input}")), AdapterFileError,
        "must be >= 1", adapter_variant(edit_config(r=0))),
    Bad("continue-with-another-rank", "override", never_load_base(cli("adapter={input}", "peft.r=16")), ConfigError,
        "peft.r='16': differs from the adapter's", adapter_variant(lambda d: None)),
    Bad("prompt-adapter-remote-tokenizer", "adapter_file", load_into_base, AdapterFileError,
        "passes keyword arguments", prompt_adapter(tokenizer_name_or_path="evil/repo", prompt_tuning_init="TEXT",
                                                   tokenizer_kwargs={"trust_remote_code": True})),
    Bad("prompt-adapter-url-tokenizer", "adapter_file", load_into_base, AdapterFileError, "is a URL",
        prompt_adapter(tokenizer_name_or_path="https://evil.example/tok")),
    Bad("prompt-adapter-nan", "adapter_file", load_into_base, AdapterFileError, "NaN or Inf",
        prompt_adapter(nan=True)),
    Bad("plan-with-target", "adapter_file", load_into_model(), AdapterFileError, "never instantiates",
        adapter_variant(lambda d: (d / "peftc_plan.json").write_text('{"spec": {"model": {"_target_": "os"}}}'))),
    Bad("plan-not-json", "adapter_file", load_into_base, AdapterFileError, "not valid JSON",
        adapter_variant(lambda d: (d / "peftc_plan.json").write_text("{"))),
    # --- adapter names and the model API ---------------------------------------------------------
    Bad("load-name-duplicate", "api", load_into_model(adapter_name="default"), ConfigError, "already exists",
        lambda world: world.good),
    Bad("load-name-module", "api", load_into_model(adapter_name="self_attn"), PlanError, "is also a module name",
        lambda world: world.good),
    Bad("load-name-container", "api", load_into_model(adapter_name="lora_A"), ConfigError, "is reserved",
        lambda world: world.good),
    Bad("load-name-empty", "api", load_into_model(adapter_name=""), ConfigError, "not a valid adapter name",
        lambda world: world.good),
    Bad("load-name-trailing-newline", "api", load_into_model(adapter_name="second\n"), ConfigError,
        "not a valid adapter name", lambda world: world.good),
    Bad("add-name-trailing-newline", "api", lambda world, _: world.model.add_adapter("second\n", world.plan),
        ConfigError, "not a valid adapter name"),
    Bad("add-name-module", "api", lambda world, _: world.model.add_adapter("mlp", world.plan), PlanError,
        "is also a module name"),
    Bad("compile-one-string", "api", lambda world, _: peftc.compile("peft=lora peft.r=4"), ConfigError,
        "is one string; peftc.compile takes a list of overrides; peftc.compile(['peft=lora', 'peft.r=4'])"),
    Bad("add-name-duplicate", "api", lambda world, _: world.model.add_adapter("default", world.plan), ConfigError,
        "already exists"),
    Bad("set-adapter-twice", "api", lambda world, _: world.model.set_adapter(["default", "default"]), ConfigError,
        "more than once"),
    Bad("set-unknown-adapter", "api", lambda world, _: world.model.set_adapter("nope"), ConfigError,
        "no such adapter"),
    Bad("save-names-twice", "api", lambda world, _: world.model.save_adapter(world.out / "adapter", ["default"] * 2),
        ConfigError, "more than once"),
    Bad("inject-fails-at-last-site-of-base", "api", fail_at_last_site("base"), MemoryError, "simulated out-of-memory"),
    Bad("inject-fails-at-last-site-of-second", "api", fail_at_last_site("model"), MemoryError,
        "simulated out-of-memory"),
    # --- writes that fail over a previous adapter --------------------------------------------------
    Bad("disk-full-mid-weights", "write", save_over_previous(disk_full_while_writing_weights), AdapterFileError,
        "the disk is full"),
    Bad("read-only-dir", "write",
        save_over_previous(lambda: failing("tempfile.mkdtemp", OSError(errno.EROFS, "Read-only file system"))),
        AdapterFileError, "read-only"),
    Bad("permission-denied-at-swap", "write",
        save_over_previous(lambda: failing("peftc.files.atomic.exchange", OSError(errno.EACCES, "Permission denied"))),
        AdapterFileError, "permission denied"),
    Bad("crash-between-renames", "write", save_over_previous(crash_between_renames), AdapterFileError,
        "cannot be written"),
    Bad("interrupt-while-staging", "write",
        save_over_previous(lambda: failing("peftc.files.adapter_files.write_adapter_files", KeyboardInterrupt())),
        KeyboardInterrupt, ""),
    # --- resume ------------------------------------------------------------------------------------
    Bad("resume-adalora", "resume", never_load_base(cli("peft=adalora", "resume=/no/such/run")), ConfigError,
        "rank allocator keeps importance scores outside the checkpoint"),
    Bad("resume-nothing-there", "resume", never_load_base(cli("resume=/no/such/run")), ConfigError,
        "no checkpoint there"),
    Bad("resume-not-a-checkpoint", "resume", never_load_base(cli("resume={input}")), ConfigError,
        "cannot be read as a checkpoint", write_file("last.ckpt", b"PK\x03\x04 not really a zip")),
    Bad("resume-empty-file", "resume", never_load_base(cli("resume={input}")), ConfigError,
        "cannot be read as a checkpoint", write_file("last.ckpt", b"")),
    Bad("resume-not-peftc", "resume", never_load_base(cli("resume={input}")), ConfigError,
        "not a peftc checkpoint", fake_checkpoint(None)),
    Bad("resume-other-plan", "resume", never_load_base(cli("resume={input}")), ConfigError,
        "was written by a different plan (seed: 99 -> 0)", fake_checkpoint("0123456789abcdef")),
]
# fmt: on


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_pristine(tmp_path_factory.mktemp("pristine"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_cleanly_and_changes_nothing(case: Bad, pristine: Any, tmp_path: Path) -> None:
    world = make_world(pristine, tmp_path)
    made = case.setup(world)
    models = {"base": model_state(world.base), "model": model_state(world.model)}
    files = file_tree(world.root)

    with pytest.raises(case.error) as info:
        case.act(world, made)

    assert case.fragment.replace("{input}", str(made)) in str(info.value), str(info.value)
    assert "\n" not in str(info.value).strip(), "a refusal is one line"
    assert not (world.root / "SENTINEL").exists(), "a pickle payload ran"
    assert_same_model(models["base"], model_state(world.base))
    assert_same_model(models["model"], model_state(world.model))
    assert file_tree(world.root) == files, "files appeared, vanished or changed"
    if case.kind == "write":  # a failed overwrite: the previous adapter still loads, unchanged
        reloaded = peftc.load_adapter(copy.deepcopy(pristine.base), world.out / "adapter")
        expected = pristine.model.adapter_state_dict("default")
        assert all(torch.equal(t, expected[k]) for k, t in reloaded.adapter_state_dict("default").items())


def test_an_output_dir_name_of_exactly_the_filesystems_limit_is_accepted(tmp_path: Path) -> None:
    """Linux allows names of 255 bytes: the limit itself is not refused (256 is, in the catalogue)."""
    from peftc.cli.main import check_output_dir

    check_output_dir(str(tmp_path / ("x" * 255)))
    check_output_dir(str(tmp_path / ("é" * 127 + "x")))  # 255 bytes in 128 characters
