#!/usr/bin/env bash
# Here (a machine with pip access): the wheels a device machine lacks, into .whl/ at the repository
# root (git-ignored through .git/info/exclude), for experiments/device/bench.sh to install there.
# The device image (see the workplace's device KINDS.md) has torch 2.11+cu130, lightning, accelerate,
# safetensors 0.8, tokenizers 0.23.2 and huggingface_hub 1.33, but no hydra-core, omegaconf or
# bitsandbytes, transformers 5.17 (peftc needs >= 5.24) and no peft of our pinned version.
# Versions are constraints.txt's. A device call carries at most 64 MiB: bitsandbytes' wheel
# (43 MB, a library per CUDA release) is repacked with the CUDA 13.0 and CPU libraries only.
#   bash experiments/device/fetch_wheels.sh      # then: run(carry=[".whl"], command="bash experiments/device/bench.sh ...")
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
rm -rf .whl && mkdir .whl
pin() { grep -i "^$1==" constraints.txt | head -1; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl \
    "$(pin transformers)" "$(pin huggingface_hub)" "$(pin httpx2)" "$(pin httpcore2)" "$(pin click)" \
    "$(pin kernels)" "$(pin tomlkit)" "$(pin regex)" "$(pin hydra-core)" "$(pin omegaconf)" "$(pin peft)" \
    "$(pin bitsandbytes)" "$(pin truststore)"
python3 -m pip wheel -q --no-deps -w .whl "$(pin antlr4-python3-runtime)"  # published as a source archive only
python3 - <<'PY'
import base64, hashlib, pathlib, zipfile
(wheel,) = pathlib.Path(".whl").glob("bitsandbytes-*.whl")
keep = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so")
pruned = wheel.with_suffix(".tmp")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(pruned, "w", zipfile.ZIP_DEFLATED) as dst:
    names = [n for n in src.namelist() if not (n.endswith(".so") and not n.endswith(keep))]
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    lines = []
    for name in names:
        if name == record:
            continue
        data = src.read(name)
        dst.writestr(name, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(data)}")
    dst.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")
pruned.replace(wheel)
PY
du -sh .whl && ls .whl
