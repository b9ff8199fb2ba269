"""Planning and injection time for 7B- and 70B-shaped Llama configs on the meta device,
against peft.get_peft_model on the same meta models, in one run.

    python experiments/bench_plan.py [--repeats 5] [--targets all-linear q_proj,v_proj] [--methods lora ia3 ...]

"compose" = Hydra composition + spec checks; "plan" = build the model graph on the meta device +
resolve targets + count + estimate (the meta-graph cache is cleared before every repeat, so each
run pays for building the model); "inject" = materialize the plan onto a meta model (no
weights); "total" = all three. peft = build the same meta model + get_peft_model, with the
config peft builds from peftc's adapter_config.json. Medians over repeats, after one warm-up.
`--rank` sets each method's size knob (`RANK_FIELDS`); OFT keeps its default block size 32.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's peftc, not an installed one

SHAPES = {
    "7B": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
    "70B": {
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
}


# The fields each method sizes its adapter with, set to --rank (AdaLoRA: init_r, target_r = half).
RANK_FIELDS = {
    "lora": ("r", "lora_alpha"),
    "adalora": ("init_r", "lora_alpha"),
    "loha": ("r", "alpha"),
    "lokr": ("r", "alpha"),
    "oft": (),
    "ia3": (),
}


def overrides_for(shape: dict[str, int], targets: str, rank: int, method: str = "lora") -> list[str]:
    config = "{" + ", ".join(f"{k}: {v}" for k, v in shape.items()) + ", tie_word_embeddings: false}"
    target = "all-linear" if targets == "all-linear" else "[" + targets + "]"
    sizes = [f"peft.{field}={rank}" for field in RANK_FIELDS[method]]
    if method == "adalora":
        sizes.append(f"peft.target_r={rank // 2}")
    return [f"peft={method}", f"model.config={config}", f"peft.target_modules={target}", *sizes, "model.name=bench"]


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up: imports, first-call caches
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def timed_on_fresh(make, fn, repeats: int) -> tuple[float, object]:
    """Median time of fn(make()) with make() untimed: each repeat injects into a fresh copy of
    the meta model, and the copy's garbage is collected first (timing the copy and subtracting
    it left the collector's pauses inside the injection's figure: 0.48 s instead of 0.16 s at 70B)."""
    fn(make())  # warm-up
    times, result = [], None
    for _ in range(repeats):
        model = make()
        gc.collect()
        start = time.perf_counter()
        result = fn(model)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure(name: str, shape: dict[str, int], targets: str, repeats: int, rank: int, method: str = "lora") -> str:
    """One table row: peftc compose/plan/inject vs peft's get_peft_model for one shape and target set."""
    import torch
    from peft import get_peft_config, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    import peftc
    from peftc.config.compose import compose, to_spec
    from peftc.planning import graph, planner
    from peftc.planning.layout import config_to_write

    hf_config = AutoConfig.for_model("llama", **shape, tie_word_embeddings=False)
    overrides = overrides_for(shape, targets, rank, method)
    compose_s, run = timed(lambda: to_spec(compose(overrides)), repeats)

    def plan_once() -> object:
        graph._META_GRAPHS.clear()
        return planner.plan(run)

    graph_s, plan = timed(plan_once, repeats)
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(hf_config)
    inject_s, ours = timed_on_fresh(
        lambda: copy.deepcopy(meta_model), lambda m: peftc.materialize(plan, base_model=m), repeats
    )
    peft_config = {**config_to_write(plan.adapter_config), "inference_mode": False}

    def peft_once() -> object:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        return get_peft_model(model, get_peft_config(dict(peft_config)))

    peft_s, theirs = timed(peft_once, repeats)
    # peft leaves AdaLoRA's frozen `ranknum` (one value per site) trainable on the meta device
    peft_trainable = theirs.get_nb_trainable_parameters()[0] - peft_meta_ranknum(theirs)
    assert plan.trainable_params == ours.trainable_parameters() == peft_trainable
    total = compose_s + graph_s + inject_s
    return f"{method:<7} {name:<5} {targets:<14} {len(plan.sites):>5} {plan.trainable_params:>12,} {peft_trainable:>12,} {compose_s:>10.3f} {graph_s:>7.3f} {inject_s:>9.3f} {total:>8.3f} {peft_s:>7.3f} {total / peft_s:>6.2f}"


def peft_meta_ranknum(model: object) -> int:
    """AdaLoRA ranknum values peft marks trainable (only happens on the meta device)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".ranknum." in n and p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", nargs="+", default=["all-linear", "q_proj,v_proj"])
    parser.add_argument("--methods", nargs="+", default=["lora"], choices=sorted(RANK_FIELDS))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()

    import torch

    print(f"torch threads {torch.get_num_threads()}, repeats {args.repeats}, rank {args.rank}")
    print(
        f"{'method':<7} {'shape':<5} {'targets':<14} {'sites':>5} {'trainable':>12} {'peft':>12} {'compose s':>10} {'plan s':>7} {'inject s':>9} {'total s':>8} {'peft s':>7} {'ratio':>6}",
        flush=True,
    )
    for method in args.methods:
        for name in args.shapes:
            for targets in args.targets:
                print(measure(name, SHAPES[name], targets, args.repeats, args.rank, method), flush=True)


if __name__ == "__main__":
    main()
