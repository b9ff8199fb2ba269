"""Test helpers: building bases for plans, the peft oracle, running the CLI."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from peftc import tasks
from peftc.planning import model_source
from peftc.planning.layout import config_to_write
from peftc.planning.plan import Plan

REPO = Path(__file__).resolve().parents[1]


def build_base(plan: Plan) -> torch.nn.Module:
    """The plan's base model with its seeded weights (what materialize would load)."""
    task = tasks.get(plan.task)
    return model_source.build_model(plan.spec.model, task.auto_class_name, task.config_overrides(plan.spec.task))


def twin_bases(plan: Plan) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = build_base(plan)
    return base, copy.deepcopy(base)


def token_batch(vocab: int = 260, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, length), generator=generator)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# PiSSA rewrites a pretrained W as W_res + B·A from a float32 SVD: on the default (pretrained demo)
# base its logits round to ~1.2e-5 of the base's, where a random base stays below 1e-5. OLoRA
# rewrites W the same way, and orthogonal's B·A is zero only up to float32 rounding (B's and A's
# rows come from orthogonal halves of a random Q): with DoRA it went past 1e-5 (1.03e-5) for 5 of
# 40 seeds, a flaky test until it got this tolerance.
PISSA_ROUNDING = 3e-5
ROUNDING_INITS = ("pissa", "olora", "orthogonal")


def run_cli(
    args: Sequence[str],
    cwd: str | os.PathLike[str],
    timeout: int = 300,
    env: dict[str, str] | None = None,
    *,
    fresh_process: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`python -m peftc ARGS` in `cwd`: exit status, stdout and stderr.

    In this process by default (the interpreter and torch/transformers/lightning imports are
    most of a small run's time); `fresh_process=True` where a new interpreter is the point:
    import-time messages, processes the run spawns itself (DDP, launchers), a default run end
    to end."""
    if fresh_process:
        # PYTHONPATH: run this checkout's peftc even when another copy is pip-installed.
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath, **(env or {})}
        full_env.pop("HYDRA_FULL_ERROR", None)
        return subprocess.run(
            [sys.executable, "-m", "peftc", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
        )
    return _run_cli_here(list(args), Path(cwd), env or {})


# Python's default warning filters (what a fresh `python -m peftc` starts with), so that a run in
# this process shows on stderr the warnings a user would see, not pytest's captured ones.
_DEFAULT_WARNING_FILTERS = (
    ("default", DeprecationWarning, "__main__"),
    ("ignore", DeprecationWarning, ""),
    ("ignore", PendingDeprecationWarning, ""),
    ("ignore", ImportWarning, ""),
    ("ignore", ResourceWarning, ""),
)


def _run_cli_here(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import contextlib
    import io
    import logging
    import warnings

    from hydra.core.global_hydra import GlobalHydra

    from peftc.cli.main import main

    stdout, stderr = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd, saved_env = sys.argv[:], os.getcwd(), dict(os.environ)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    status = 0
    os.environ.update({"HF_HUB_OFFLINE": "1", **env})
    os.environ.pop("HYDRA_FULL_ERROR", None)
    sys.argv = ["peftc", *args]
    os.chdir(cwd)
    GlobalHydra.instance().clear()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category, module in _DEFAULT_WARNING_FILTERS:
                warnings.filterwarnings(action, category=category, module=module)
            warnings.showwarning = _show_warning_on_current_stderr
            try:
                main()
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        GlobalHydra.instance().clear()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    return subprocess.CompletedProcess(["peftc", *args], status, stdout.getvalue(), stderr.getvalue())


def _show_warning_on_current_stderr(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    import warnings

    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def peft_lora_config(plan: Plan, **extra: Any) -> Any:
    """The peft LoraConfig equivalent to a LoRA plan."""
    from peft import LoraConfig

    spec = plan.spec.peft
    targets = spec.target_modules
    if isinstance(targets, tuple):
        targets = list(targets)
    return LoraConfig(
        task_type=plan.task_type,
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=targets,
        exclude_modules=spec.exclude_modules
        if not isinstance(spec.exclude_modules, tuple)
        else list(spec.exclude_modules),
        use_rslora=spec.use_rslora,
        init_lora_weights=spec.init_lora_weights,
        rank_pattern=dict(spec.rank_pattern or {}),
        alpha_pattern=dict(spec.alpha_pattern or {}),
        layers_to_transform=list(spec.layers_to_transform)
        if isinstance(spec.layers_to_transform, tuple)
        else spec.layers_to_transform,
        layers_pattern=spec.layers_pattern,
        **extra,
    )


def peft_config_from_plan(plan: Plan) -> Any:
    """The peft config equivalent to a plan, built from the adapter_config.json we would write
    (so the test also checks that our config fields mean the same thing to peft)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    fields = config_to_write(plan.adapter_config)
    fields["inference_mode"] = False
    return PEFT_TYPE_TO_CONFIG_MAPPING[fields.pop("peft_type")](**fields)


def assert_greedy(logits: torch.Tensor, chosen: torch.Tensor, tolerance: float = 1e-5) -> None:
    """Every chosen token is the argmax of the reference logits that predict it (teacher forcing),
    so generate() produced exactly the reference's greedy decode; only a tie within float noise
    could excuse another token. logits: (batch, steps, vocab) aligned with chosen: (batch, steps)."""
    best = logits.max(dim=-1).values
    picked = logits.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    margin = (best - picked).max().item()
    assert margin <= tolerance * max(1.0, best.abs().max().item()), f"not the greedy token (logit gap {margin:.3g})"


def assert_causal_greedy(reference: Any, generated: torch.Tensor, prompt_length: int, **extra: Any) -> None:
    """generated (prompt + new tokens) is the greedy continuation under reference's forward."""
    logits = reference(input_ids=generated, attention_mask=torch.ones_like(generated), **extra).logits
    width = generated.shape[1]  # virtual tokens add positions in front: align on the right
    predicting = logits[:, -width:][:, prompt_length - 1 : -1]
    assert_greedy(predicting, generated[:, prompt_length:])


def peft_pair(overrides: Sequence[str]) -> tuple[Plan, Any, torch.nn.Module]:
    """Our prompt/adaption model and peft's on identical bases, peft's adapter weights copied
    into ours. Adaption prompt gates are opened (0.7), or both sides would be the base model."""
    from peft import get_peft_model, get_peft_model_state_dict

    import peftc
    from peftc.files.load import fill

    plan = peftc.compile(list(overrides))
    base = build_base(plan)
    with torch.random.fork_rng(devices=[]):  # peft draws the initial prompt from the global RNG
        torch.manual_seed(0)
        theirs = get_peft_model(copy.deepcopy(base), peft_config_from_plan(plan)).eval()
    ours = peftc.materialize(plan, base_model=base).eval()
    if plan.prompt is not None:
        ours.prompt_encoders["default"].load_state_dict(theirs.prompt_encoder["default"].state_dict())
    else:
        with torch.no_grad():
            for name, param in theirs.named_parameters():
                if name.endswith("adaption_gate"):
                    param.fill_(0.7)
        # peft saves no task head for adaption prompt; ours keeps its own (identical) copy
        own = {k: v.detach().clone() for k, v in ours.adapter_state_dict("default").items()}
        fill(ours, "default", {**own, **get_peft_model_state_dict(theirs)})
    return plan, ours, theirs


def offline_hub_snapshot(tmp_path: Path, monkeypatch: Any, repo_dir: str) -> Path:
    """An empty snapshot of `repo_dir` (e.g. 'models--org--name', 'datasets--org--name') in a Hugging
    Face cache under tmp_path that huggingface_hub reads offline, as it keeps downloads; fill it and
    ask for org/name. The working directory moves to tmp_path, so no local org/ directory shadows it."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / repo_dir
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return repo / "snapshots" / commit
