"""Prompt methods from the command line (slow: each run starts Python, torch and Lightning)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peftc
from tests.helpers import build_base, max_diff, run_cli, token_batch

pytestmark = pytest.mark.slow


def test_prompt_tuning_sweep_over_virtual_tokens(tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    result = run_cli(
        [
            "-m",
            "peft=prompt_tuning",
            "peft.num_virtual_tokens=4,8,16",
            "trainer.max_steps=2",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    for job, tokens in (("0", 4), ("1", 8), ("2", 16)):
        adapter = tmp_path / job / "adapter"
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert (config["peft_type"], config["num_virtual_tokens"], config["token_dim"]) == ("PROMPT_TUNING", tokens, 64)
        assert tuple(load_file(adapter / "adapter_model.safetensors")["prompt_embeddings"].shape) == (tokens, 64)
    adapter = tmp_path / "2" / "adapter"
    ours = peftc.load_adapter(adapter)
    theirs = PeftModel.from_pretrained(build_base(peftc.compile([])), adapter).eval()
    x = token_batch()
    assert max_diff(ours(input_ids=x).logits, theirs(input_ids=x).logits) <= 1e-5


def test_bert_prefix_tuning_trains_saves_and_reloads(tmp_path: Path) -> None:
    """peft 0.21 refuses prefix tuning for BERT on transformers 5; peftc trains it end to end."""
    result = run_cli(
        ["peft=prefix_tuning", "model=tiny_bert", "task=seq_cls", "trainer.max_steps=3", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 3 and 0.0 <= metrics["val_accuracy"] <= 1.0
    model = peftc.load_adapter(tmp_path / "adapter")
    x = token_batch()
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        with model.disable_adapter():
            assert max_diff(model(input_ids=x).logits, adapted) > 1e-6


def test_refused_combination_exits_2_with_the_reason(tmp_path: Path) -> None:
    result = run_cli(
        ["peft=prefix_tuning", "trainer.gradient_checkpointing=true", f"hydra.run.dir={tmp_path}"], cwd=tmp_path
    )
    assert result.returncode == 2
    assert (
        "error: trainer.gradient_checkpointing=True: prefix_tuning hands the model its prefix as a key/value cache"
        in result.stderr
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "adapter").exists()
