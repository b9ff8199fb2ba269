"""Loading a checkpoint into a QLoRA model (issue #14): peak memory and time, peftc beside
transformers + peft, each in a fresh process on the same bf16 checkpoint.

    python experiments/bench_quant_load.py [--quant bnb_nf4|quanto_int8|torchao_int8]
        [--hidden 1024 --layers 12 --repeats 3 --checkpoint-dtype bfloat16]

Paths measured (LoRA r=8 on q,v; --quant bnb_nf4: double quantization, compute in bfloat16;
quanto_int8: int8 weights, scale per row; torchao_int8: Int8WeightOnlyConfig):
  peftc         `peftc.materialize(plan)` with model=hf quant=<quant>: quantized while transformers
                reads the checkpoint (the default now)
  peftc-after   the previous path: the whole model loaded in bf16, then quantized
  hf+peft       `from_pretrained(quantization_config=<transformers' config for it>)` + `get_peft_model`
Peak memory is the process's peak anonymous RSS (RssAnon sampled every 5 ms) minus its value after
the imports: what loading allocates. (VmHWM is no use here: safetensors maps the checkpoint, so
every path "peaks" at about the file's size in page cache.) Both libraries keep every unquantized
weight in bf16 here (quant.float32_unquantized=false; peft without prepare_model_for_kbit_training).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def make_checkpoint(directory: Path, hidden: int, layers: int, dtype: str) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(getattr(torch, dtype))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(directory, safe_serialization=True)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


# What each --quant option needs: its library (imported before the memory baseline), its peftc
# overrides, and transformers' own quantization config for the hf+peft path.
LIBRARIES = {"bnb_nf4": "bitsandbytes", "quanto_int8": "optimum.quanto", "torchao_int8": "torchao"}
QUANT_OVERRIDES = {"bnb_nf4": ["quant.compute_dtype=bfloat16"], "quanto_int8": [], "torchao_int8": []}


def transformers_config(quant: str) -> object:
    import torch
    from transformers import BitsAndBytesConfig, QuantoConfig, TorchAoConfig

    if quant == "quanto_int8":
        return QuantoConfig(weights="int8")
    if quant == "torchao_int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def run_path(path: str, checkpoint: str, quant: str) -> dict[str, float]:
    """In this (fresh) process: import, then load one way; memory and time of the load alone."""
    import importlib

    import torch  # noqa: F401  (imports before the baseline)
    import transformers  # noqa: F401

    import peftc

    overrides = [
        "model=hf",
        f"model.name_or_path={checkpoint}",
        "model.dtype=bfloat16",
        "model.tokenizer=pkg:peftc/assets/byte_tokenizer",
        f"quant={quant}",
        *QUANT_OVERRIDES[quant],
        "quant.float32_unquantized=false",
    ]
    plan = peftc.compile(overrides)
    import threading

    import peft  # noqa: F401

    importlib.import_module(LIBRARIES[quant])

    baseline = rss_kib("RssAnon")
    peak = [baseline]
    loading = threading.Event()

    def sample() -> None:
        while not loading.is_set():
            peak[0] = max(peak[0], rss_kib("RssAnon"))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if path == "peftc":
        model = peftc.materialize(plan)
    elif path == "peftc-after":
        from peftc import quant, tasks
        from peftc.planning import model_source

        task = tasks.get(plan.task)
        base = model_source.build_model(plan.spec.model, task.auto_class_name)
        base = quant.for_spec(plan.spec.quant).quantize(plan.spec.quant, base, plan.quantization.modules)
        model = peftc.materialize(plan, base)
    else:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(
            checkpoint, quantization_config=transformers_config(quant), dtype=torch.bfloat16, device_map={"": "cpu"}
        )
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    seconds = time.perf_counter() - start
    loading.set()
    sampler.join()
    peak[0] = max(peak[0], rss_kib("RssAnon"))
    assert model is not None
    return {"seconds": seconds, "peak_mib": (peak[0] - baseline) / 1024, "hwm_mib": rss_kib("VmHWM") / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--quant", default="bnb_nf4", choices=sorted(LIBRARIES))
    parser.add_argument("--one", nargs=3, metavar=("PATH", "CHECKPOINT", "QUANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_path(*args.one)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "llama"
        size = make_checkpoint(checkpoint, args.hidden, args.layers, args.checkpoint_dtype)
        bf16 = size // (2 if args.checkpoint_dtype == "float32" else 1)
        print(
            f"quant={args.quant}; checkpoint: hidden {args.hidden}, {args.layers} layers, {args.checkpoint_dtype} "
            f"safetensors {size / 2**20:.0f} MiB (bf16: {bf16 / 2**20:.0f} MiB), loaded as bf16"
        )
        rows = {}
        for path in ("peftc", "peftc-after", "hf+peft"):
            runs = []
            for _ in range(args.repeats):
                out = subprocess.run(
                    [sys.executable, __file__, "--one", path, str(checkpoint), args.quant],
                    capture_output=True,
                    text=True,
                    check=True,
                    env={"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                )
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            rows[path] = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "peak_mib", "hwm_mib")}
        reference = rows["hf+peft"]
        print("| path | load s | vs hf+peft | peak anon MiB | vs bf16 checkpoint | vs hf+peft | VmHWM MiB |")
        print("|---|---|---|---|---|---|---|")
        for path, row in rows.items():
            print(
                f"| {path} | {row['seconds']:.2f} | {row['seconds'] / reference['seconds']:.2f} | "
                f"{row['peak_mib']:.0f} | {row['peak_mib'] * 2**20 / bf16:.2f} | "
                f"{row['peak_mib'] / reference['peak_mib']:.2f} | {row['hwm_mib']:.0f} |"
            )


if __name__ == "__main__":
    main()
