"""Planning and injection time for 7B- and 70B-shaped Llama configs on the meta device,
against peft.get_peft_model on the same meta models, in one run.

    python experiments/bench_plan.py [--repeats 5] [--targets all-linear q_proj,v_proj]

"compose" = Hydra composition + spec checks; "plan" = build the model graph on the meta device +
resolve targets + count + estimate (the meta-graph cache is cleared before every repeat, so each
run pays for building the model); "inject" = materialize the plan onto a meta model (no
weights); "total" = all three. peft = build the same meta model + get_peft_model.
Medians over repeats, after one warm-up.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

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


def overrides_for(shape: dict[str, int], targets: str, rank: int) -> list[str]:
    config = "{" + ", ".join(f"{k}: {v}" for k, v in shape.items()) + ", tie_word_embeddings: false}"
    target = "all-linear" if targets == "all-linear" else "[" + targets + "]"
    return [
        f"model.config={config}",
        f"peft.target_modules={target}",
        f"peft.r={rank}",
        f"peft.lora_alpha={rank}",
        "model.name=bench",
    ]


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up: imports, first-call caches
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure(name: str, shape: dict[str, int], targets: str, repeats: int, rank: int) -> str:
    """One table row: peftc compose/plan/inject vs peft's get_peft_model for one shape and target set."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    import peftc
    from peftc import graph, planner
    from peftc.compose import compose
    from peftc.spec import to_spec

    hf_config = AutoConfig.for_model("llama", **shape, tie_word_embeddings=False)
    overrides = overrides_for(shape, targets, rank)
    compose_s, run = timed(lambda: to_spec(compose(overrides)), repeats)

    def plan_once() -> object:
        graph._META_GRAPHS.clear()
        return planner.plan(run)

    graph_s, plan = timed(plan_once, repeats)
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(hf_config)
    copy_s, _ = timed(lambda: copy.deepcopy(meta_model), repeats)
    inject_s, ours = timed(lambda: peftc.materialize(plan, base_model=copy.deepcopy(meta_model)), repeats)
    inject_s -= copy_s  # the deepcopy only gives each repeat a fresh model
    peft_targets = "all-linear" if targets == "all-linear" else targets.split(",")

    def peft_once() -> object:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        return get_peft_model(
            model, LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=rank, target_modules=peft_targets)
        )

    peft_s, theirs = timed(peft_once, repeats)
    assert plan.trainable_params == ours.trainable_parameters() == theirs.get_nb_trainable_parameters()[0]
    total = compose_s + graph_s + inject_s
    return f"{name:<5} {targets:<14} {len(plan.sites):>5} {plan.trainable_params:>12,} {compose_s:>10.3f} {graph_s:>7.3f} {inject_s:>9.3f} {total:>8.3f} {peft_s:>7.3f} {total / peft_s:>6.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", nargs="+", default=["all-linear", "q_proj,v_proj"])
    args = parser.parse_args()

    import torch

    print(f"torch threads {torch.get_num_threads()}, repeats {args.repeats}, rank {args.rank}")
    print(
        f"{'shape':<5} {'targets':<14} {'sites':>5} {'trainable':>12} {'compose s':>10} {'plan s':>7} {'inject s':>9} {'total s':>8} {'peft s':>7} {'ratio':>6}"
    )
    for name, shape in SHAPES.items():
        for targets in args.targets:
            print(measure(name, shape, targets, args.repeats, args.rank))


if __name__ == "__main__":
    main()
