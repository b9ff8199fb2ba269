"""action=merge and action=export on a saved adapter.

merge:  <output>/merged, the base model with the adapter folded in and its tokenizer, loadable by
        transformers' `from_pretrained` (a quantized base is merged into its unquantized weights,
        as `save_merged=true` does).
export: <output>/export, the adapter's files plus a model card (README.md: peft's metadata header,
        what was trained, the run's metrics when they sit beside the adapter, how to load it),
        ready to upload to the Hugging Face Hub.
Both directories are written atomically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from peftc import tasks
from peftc.config.spec import RunSpec
from peftc.files import adapter_files
from peftc.files.atomic import atomic_directory
from peftc.files.run_dir import MERGED_DIR, METRICS_FILE
from peftc.planning.model_source import HUB_ID
from peftc.planning.plan import Plan

EXPORT_DIR = "export"


def merge(model: Any, run: RunSpec, output_dir: Path) -> dict[str, Any]:
    from peftc.planning.model_source import load_tokenizer, without_progress_bars

    plan = model.plan_of("default")
    merged = merged_model(model, plan)
    target = output_dir / MERGED_DIR
    with atomic_directory(target) as staging, without_progress_bars():
        merged.save_pretrained(staging)
        load_tokenizer(run.model).save_pretrained(staging)
    print(f"merged model saved to {target} (load it with {tasks.get(plan.task).auto_class_name}.from_pretrained)")
    return {"status": "merged", "merged": str(target)}


def merged_model(model: Any, plan: Plan) -> Any:
    """The trained adapter folded into a plain transformers model.

    A quantized base is not merged into (requantizing rounds the update; 4-bit backends refuse):
    the adapter goes into the unquantized base rebuilt from `model.*` instead, which is exact.
    A checkpoint saved quantized has no unquantized weights: the adapter goes into its weights
    dequantized (what the adapter was trained over), in model.dtype.
    """
    if plan.quantization is None or not plan.quantization.modules:
        return model.merge_and_unload(safe_merge=True)  # a NaN adapter must not be written into a full model
    import torch

    from peftc import tasks
    from peftc.files.load import fill
    from peftc.planning import model_source
    from peftc.quant.base import dequantized
    from peftc.runtime.materialize import materialize

    tensors = {k: t.detach().clone() for k, t in model.adapter_state_dict(plan.adapter_name).items()}
    task = tasks.get(plan.task)
    base = model_source.build_model(plan.spec.model, task.auto_class_name, task.config_overrides(plan.spec.task))
    # rebuilt without quantizing, it is quantized only when the checkpoint is saved so
    base = dequantized(base, getattr(torch, plan.model.dtype))
    plain = materialize(plan, base.requires_grad_(False), adapter_name=plan.adapter_name, init=False)
    fill(plain, plan.adapter_name, tensors)
    return plain.merge_and_unload(safe_merge=True)


def export(model: Any, run: RunSpec, output_dir: Path) -> dict[str, Any]:
    source = adapter_files.adapter_directory(str(run.adapter))
    plan = model.plan_of("default")
    config = adapter_files.read_config(source)
    metrics = _run_metrics(source)
    target = output_dir / EXPORT_DIR
    with atomic_directory(target) as staging:
        for name in (adapter_files.CONFIG_NAME, adapter_files.WEIGHTS_NAME, adapter_files.PLAN_NAME):
            if (source / name).is_file():
                shutil.copy2(source / name, staging / name)
        (staging / "README.md").write_text(model_card(plan, config, metrics), encoding="utf-8")
    print(f"export written to {target}: adapter files and README.md (model card); upload the directory as it is")
    return {"status": "exported", "export": str(target)}


def _run_metrics(adapter_dir: Path) -> dict[str, Any]:
    """metrics.json of the run that saved the adapter (RUN/adapter -> RUN/metrics.json), if there."""
    path = adapter_dir.parent / METRICS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_hub_id(base: str) -> bool:
    """Whether the card's metadata can name the base: the Hub takes a model id there, and a local
    path (or a config-built model's name) would be an invalid entry that also shows the path."""
    return HUB_ID.fullmatch(base) is not None and not Path(base).expanduser().exists()


def model_card(plan: Any, config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The README.md the Hub shows: peft's metadata header, then what the adapter is and how to load it."""
    base = config.get("base_model_name_or_path") or plan.model.name
    task = tasks.get(plan.task)
    named = [f"base_model: {base}"] if is_hub_id(base) else []
    header = ["---", "library_name: peft", *named, "tags:", "- peftc", f"- {plan.method}"]
    header += [f"- {plan.task}", "---", ""]
    facts = [
        ("method", f"{plan.method} (peft_type {plan.peft_type})"),
        ("task", f"{plan.task}" + (f" (task_type {plan.task_type})" if plan.task_type else "")),
        ("base model", f"{base} ({plan.model.model_class})"),
        ("trainable parameters", f"{plan.trainable_params:,} of {plan.total_params:,} ({plan.trainable_percent:.4f}%)"),
        ("adapted modules", f"{len(plan.sites)}"),
    ]
    facts += [(key, f"`{config[key]}`") for key in ("r", "lora_alpha", "target_modules") if config.get(key) is not None]
    lines = [*header, f"# {plan.method} adapter for {base}", "", "Trained with peftc.", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in facts]
    shown = {
        k: v for k, v in sorted(metrics.items()) if k.startswith(("val_", "train_")) and isinstance(v, (int, float))
    }
    if shown:
        lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in shown.items()]
        if "steps" in metrics:
            lines += ["", f"after {metrics['steps']:g} training steps."]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {task.auto_class_name}",
        "",
        f'base = {task.auto_class_name}.from_pretrained("{base}")',
        'model = PeftModel.from_pretrained(base, "<this repository or directory>")',
        "```",
        "",
        'or `peftc.load_adapter("<this directory>")`.',
        "",
    ]
    return "\n".join(lines)
