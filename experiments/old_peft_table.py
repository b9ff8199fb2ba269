"""The table of experiments/RESULTS (old peft files): every adapter that
experiments/make_old_peft_fixtures.py wrote under ROOT/peft_<version>/, loaded by peftc and by
the installed peft (0.22), their logits compared with the ones the old release recorded.

    python experiments/old_peft_table.py /tmp/oldgen
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

import peftc

TOLERANCE = 1e-5


def base_model(bases: Path, name: str) -> torch.nn.Module:
    spec = json.loads((bases / f"{name}.json").read_text())
    config = getattr(transformers, spec["config_class"])(**spec["config"])
    config._attn_implementation = "eager"
    model = getattr(transformers, spec["class"])(config).eval()
    missing, unexpected = model.load_state_dict(load_file(bases / f"{name}.safetensors"), strict=False)
    assert not unexpected, unexpected
    model.tie_weights()
    return model


def verdict(load, expected: dict[str, torch.Tensor]) -> str:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = load()
        inputs = {name: tensor for name, tensor in expected.items() if name != "logits"}
        with torch.no_grad():
            logits = model(**inputs).logits
    except Exception as exc:  # noqa: BLE001 (a table of outcomes)
        return f"refused: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    if logits.shape != expected["logits"].shape:
        return f"WRONG shape {tuple(logits.shape)}"
    diff = (logits - expected["logits"]).abs().max().item()
    notes = sorted(
        {str(w.message)[:160] for w in caught if "peft" in str(w.message).lower() or "adapter" in str(w.message)}
    )
    status = "equal" if diff <= TOLERANCE else f"WRONG {diff:.2e}"
    return status + (f" (warns: {notes})" if notes else "")


def main() -> None:
    from peft import PeftModel

    root = Path(sys.argv[1])
    bases = root / "old_peft_bases"
    wanted = sys.argv[2:]
    for release in sorted(root.glob("peft_*")):
        for case in sorted(p for p in release.iterdir() if p.is_dir()):
            if wanted and case.name not in wanted:
                continue
            expected = load_file(case / "expected.safetensors")
            model = next(name for name in ("llama", "gpt2", "bert", "t5") if f"_{name}" in case.name)
            ours = verdict(lambda m=model, c=case: peftc.load_adapter(base_model(bases, m), c), expected)
            theirs = verdict(
                lambda m=model, c=case: PeftModel.from_pretrained(base_model(bases, m), c).eval(), expected
            )
            print(f"| {release.name[5:].replace('_', '.')} | {case.name} | peftc: {ours} | peft 0.22: {theirs} |")


if __name__ == "__main__":
    main()
