"""Every backend x LoRA trains from the command line and leaves an adapter that loads back onto a
quantized base with the outputs of the dequantized reference (slow: one CLI process for all)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import peftc
from peftc.planning.graph import replace_module
from peftc.quant.base import backend_of
from tests.helpers import max_diff, run_cli, token_batch

pytestmark = pytest.mark.slow

BACKENDS = ["bnb_int8", "bnb_nf4", "bnb_fp4", "quanto_int8", "quanto_int4", "torchao_int8"]
NOISE = ("Failed to load", "Enum subclass", "kernels-community", "MatMul8bitLt", "Detected no triton")
# Any warning a library logs through Hydra's job logging (`[time][logger][WARNING] - ...`) that is
# not peftc's own: a new release of a backend (kernels 0.19 under transformers 5.25) starts a new message.
FOREIGN_LOG_WARNING = re.compile(r"^\[[^\]]*\]\[(?!peftc)[^\]]*\]\[(WARNING|ERROR)\]")


def noise_lines(output: str) -> list[str]:
    """Lines of a run's output that are backend noise rather than something the user must act on."""
    return [line for line in output.splitlines() if any(n in line for n in NOISE) or FOREIGN_LOG_WARNING.match(line)]


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The model with every quantized Linear replaced by an nn.Linear holding its dequantized weight."""
    for path, module in list(model.named_modules()):
        backend = backend_of(module)
        if backend is None:
            continue
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        plain.weight.data = backend.dequantize(module)
        if module.bias is not None:
            plain.bias.data = module.bias.data.float()
        replace_module(model, path, plain.requires_grad_(False))
    return model


def test_every_backend_trains_from_the_cli_and_its_adapter_loads_back(tmp_path: Path) -> None:
    from peft import PeftModel

    result = run_cli(
        [
            "-m",
            f"quant={','.join(BACKENDS)}",
            "peft.target_modules=all-linear",
            "trainer.max_steps=3",
            "trainer.limit_val_batches=1",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=tmp_path,
        timeout=600,
        fresh_process=True,  # import-time backend messages show only in a new interpreter
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not noise_lines(result.stdout + result.stderr)
    x = token_batch()
    for job, backend in enumerate(BACKENDS):
        run_dir = tmp_path / str(job)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["steps"] == 3 and torch.isfinite(torch.tensor(metrics["val_loss"]))
        plan = json.loads((run_dir / "plan.json").read_text())
        assert plan["quant"] == backend and len(plan["quantization"]["modules"]) == 14
        loaded = peftc.load_adapter(run_dir / "adapter")  # base rebuilt and quantized like the run's
        assert loaded.plan_of("default").quantization.backend == backend
        base = loaded.base_model
        assert sum(backend_of(m) is not None for m in base.modules()) == 14
        with torch.no_grad():
            ours = loaded(input_ids=x).logits
            with loaded.disable_adapter():
                assert max_diff(ours, loaded(input_ids=x).logits) > 1e-6, "training must have moved the adapter"
        # the peft package, over the dequantized base, reads the same adapter to the same outputs
        reference = PeftModel.from_pretrained(dequantized_copy(loaded.unload()), run_dir / "adapter").eval()
        with torch.no_grad():
            theirs = reference(input_ids=x).logits
        bound = 3e-2 if backend == "bnb_int8" else 1e-5  # bnb int8 eval also rounds activations
        assert max_diff(ours, theirs) <= bound * theirs.abs().max().item(), backend


def test_unquantized_runs_print_no_backend_import_noise(tmp_path: Path) -> None:
    result = run_cli(["dry_run=true", f"hydra.run.dir={tmp_path}"], cwd=tmp_path, fresh_process=True)
    assert result.returncode == 0, result.stderr
    assert not noise_lines(result.stdout + result.stderr)


def test_a_quantization_that_cannot_work_is_refused_before_training(tmp_path: Path) -> None:
    result = run_cli(["quant=bnb_nf4", "model=tiny_gpt2", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "error: quant='bnb_nf4': would quantize no module of GPT2LMHeadModel" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "adapter").exists()
