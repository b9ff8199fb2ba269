#!/usr/bin/env bash
# There (a device machine, called through the device tool with carry=[".whl"] after
# experiments/device/fetch_wheels.sh ran here): install the carried wheels beside the image's
# torch, put this checkout's peftc on the path, say what runs, then run one part of
# experiments/bench_gpu.py: its table, log, JSON (rewritten after every row) and one profiled step
# per side and row go to $OUT. The part stops at the time limit, keeping its rows.
#   bash experiments/device/bench.sh eager 420      # every eager row (issue #17's table)
#   bash experiments/device/bench.sh compiled 420   # compiled rows and the eager rows they must beat
#   bash experiments/device/bench.sh check 60       # installs and imports only
# Arguments after the time limit go to bench_gpu.py (e.g. --steps 5).
set -uo pipefail
part=${1:-all}
limit=${2:-540}
shift $(($# < 2 ? $# : 2))
out=${OUT:-device_out}
mkdir -p "$out"
site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
# peftc from this checkout, not built (the image's setuptools is unknown): pyproject ships conf/ as
# the package peftc.conf, and a link puts it there in this copy of the tree
[ -e peftc/conf ] || ln -s ../conf peftc/conf
export PYTHONPATH=$PWD:$site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 - <<'PY' 2>&1 | tee -a "$out/device.txt"
import importlib

for name in ("torch", "transformers", "huggingface_hub", "peft", "bitsandbytes", "hydra", "lightning", "triton", "peftc"):
    try:
        module = importlib.import_module(name)
    except ImportError as error:  # Triton: the compiled rows' inductor needs it on a GPU, nothing else does
        print(name, "absent:", error)
        continue
    print(name, getattr(module, "__version__", "?"), module.__file__)
PY
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
[ "$part" = check ] && exit 0
timeout --signal=INT "$limit" python3 experiments/bench_gpu.py --part "$part" --json "$out/$part.json" \
    --profile "$out/$part.profile.txt" "$@" 2>&1 |
    tee "$out/$part.log"
