"""Write the peft 0.21.2 LoRA-on-MultiheadAttention fixture (tests/fixtures/peft_0_21_2/lora_mha).

peft before 0.22 added an attention's out_proj LoRA update twice (huggingface/peft#3774); peft
0.22 and peftc count it once and double out_proj's lora_B when they load a file an older peft
wrote. This script makes such a file with peft 0.21.2 itself, so tests/test_lora_mha_legacy.py
can check that peftc (and peft 0.22) give the outputs peft 0.21.2 gave:

    PYTHONPATH=/path/to/peft-0.21.2 python experiments/make_lora_mha_legacy_fixture.py

It writes adapter/ (peft's adapter_config.json and adapter_model.safetensors; its model-card
README left out) and expected.safetensors ("input", and peft 0.21.2's "output" for it), about
4 KB. The base is tests/attention_model.py's TinyAttention(seed=SEED); the adapter on its
attention module (in_proj and out_proj) is peft's default init moved off the identity under the
same seed, as training would. peftc is not imported: every number comes from peft 0.21.2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "tests" / "fixtures" / "peft_0_21_2" / "lora_mha"
PEFT_VERSION = "0.21.2"
SEED = 0
PERTURBATION = 0.1  # how far each adapter tensor moves off its init: B must not stay zero


def main() -> None:
    sys.path.insert(0, str(ROOT))  # tests.attention_model from this checkout
    import peft
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from tests.attention_model import TinyAttention, sequences

    if peft.__version__ != PEFT_VERSION:
        raise SystemExit(f"needs peft {PEFT_VERSION} first on PYTHONPATH, found {peft.__version__} ({peft.__file__})")
    torch.manual_seed(SEED)
    model = get_peft_model(TinyAttention(seed=SEED), LoraConfig(target_modules=["attn"], r=2, lora_alpha=4))
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(PERTURBATION * torch.randn(param.shape, generator=generator))
    model.eval()
    inputs = sequences(seed=SEED)
    with torch.no_grad():
        outputs = model(input_ids=inputs)
    adapter = TARGET / "adapter"
    model.save_pretrained(adapter)
    (adapter / "README.md").unlink(missing_ok=True)
    save_file({"input": inputs, "output": outputs}, str(TARGET / "expected.safetensors"))
    size = sum(path.stat().st_size for path in TARGET.rglob("*") if path.is_file())
    print(f"wrote {TARGET} ({size} bytes) with peft {peft.__version__}")


if __name__ == "__main__":
    main()
