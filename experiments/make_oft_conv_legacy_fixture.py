"""Write tests/fixtures/peft_0_21_2/oft_conv: an OFT adapter that peft 0.21.2 trained on Conv2d
layers, with an input and peft 0.21.2's output for it.

peft 0.21 ran OFT on a Conv2d by rotating the input's k x k patches and folding them back; 0.22
rotates the weight instead, which gives such an adapter other outputs. peftc keeps the outputs
an adapter was trained to give (peftc/methods/oft, `conv_transform`), and
tests/test_oft_conv_legacy.py checks that against this fixture, written by peft 0.21.2 itself:

    PYTHONPATH=/tmp/peft0212 python experiments/make_oft_conv_legacy_fixture.py

where /tmp/peft0212 holds only peft 0.21.2 (`pip install --no-deps --target /tmp/peft0212
peft==0.21.2`); it shadows the peft the venv has. The adapter is tests/conv_model.TinyConvNet's
3x3 `conv`, its 1x1 `pointwise` (where both transforms agree) and its grouped 3x3 `grouped`
(which peft 0.22 refuses), moved off the identity as training would; the files are a few KB.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.conv_model

from tests.conv_model import TinyConvNet, images  # noqa: E402

TARGET = ROOT / "tests" / "fixtures" / "peft_0_21_2" / "oft_conv"
PEFT_VERSION = "0.21.2"
EXPECTED = "expected.safetensors"  # the input and peft's output on it, beside the adapter's files


def main() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":  # peft writes target_modules from a set: fix its order
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    import peft
    from safetensors.torch import save_file

    if peft.__version__ != PEFT_VERSION:
        sys.exit(f"peft {peft.__version__} is importable; put peft {PEFT_VERSION} first on PYTHONPATH")
    config = peft.OFTConfig(target_modules=["conv", "pointwise", "grouped"], oft_block_size=4, r=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on the conv layers
        model = peft.get_peft_model(TinyConvNet(seed=0), config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:  # the oft_R weights: Q = 0, R = I at init
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    inputs = images(batch=2, seed=1)
    with torch.no_grad():
        outputs = model(inputs)
    shutil.rmtree(TARGET, ignore_errors=True)
    model.save_pretrained(TARGET)
    (TARGET / "README.md").unlink(missing_ok=True)  # peft's model card: nothing the test reads
    # one metadata entry: safetensors writes several in no fixed order
    metadata = {"written_by": f"peft {peft.__version__}, torch {torch.__version__}, experiments/{Path(__file__).name}"}
    save_file({"input": inputs, "output": outputs.contiguous()}, TARGET / EXPECTED, metadata=metadata)
    for path in sorted(TARGET.iterdir()):
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
