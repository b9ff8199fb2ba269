"""peftc.train: the CLI's training path from Python (notebooks, scripts), without sys.argv."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import peftc

QUICK = ["trainer.max_steps=3", "predict_samples=0", "trainer.logger=none"]


def test_train_from_python_leaves_what_the_cli_leaves(tmp_path: Path) -> None:
    argv = sys.argv[:]
    result = peftc.train(["peft.r=4", *QUICK], output_dir=tmp_path / "run")
    assert sys.argv == argv
    assert result.adapter_dir == tmp_path / "run" / "adapter"
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    saved = json.loads((tmp_path / "run" / "plan.json").read_text())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["fingerprint"] == result.plan.fingerprint and result.plan.spec.peft.r == 4
    assert result.metrics["val_loss"] == pytest.approx(metrics["val_loss"]) and result.metrics["steps"] == 3
    assert (
        peftc.load_adapter(result.adapter_dir).plan_of("default").adapter_fingerprint == result.plan.adapter_fingerprint
    )


@pytest.mark.parametrize(
    ("overrides", "key"),
    [(["dry_run=true"], "dry_run"), (["action=eval"], "action"), (["peft.r=0"], "peft.r")],
)
def test_what_train_cannot_do_is_a_config_error_and_writes_nothing(
    overrides: list[str], key: str, tmp_path: Path
) -> None:
    with pytest.raises(peftc.ConfigError) as refused:
        peftc.train(overrides, output_dir=tmp_path / "run")
    assert str(refused.value).startswith(key)
    assert not (tmp_path / "run").exists()
