"""Prompt-learning methods and adaption prompt beside peft, per model x task.

    python experiments/prompt_methods.py [--skip-70b]

Table 1 (tiny models with weights): trainable counts (plan, materialized, peft), the largest
|logit difference| against peft for the same weights, and whether greedy generate() equals
greedy decoding by full forward passes (no cache) under peft's own forward, for ours and for
peft's generate(). Where peft cannot run a combination on transformers 5 (prefix tuning for
sequence classification), the reference is the base model called with the cache built by
peft's own get_prompt. Table 2: prompt shapes derived for a 70B-shaped grouped-query Llama on
the meta device, with the compile time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.set_num_threads(2)

METHODS = [
    ("prompt_tuning", []),
    ("p_tuning", []),
    ("p_tuning", ["peft.encoder_reparameterization_type=LSTM"]),
    ("prefix_tuning", []),
    ("prefix_tuning", ["peft.prefix_projection=true"]),
    ("multitask_prompt_tuning", ["peft.num_tasks=3", "peft.num_ranks=2"]),
    ("adaption_prompt", ["peft.adapter_layers=2"]),
]
SETUPS = [
    ("tiny_llama", "causal_lm", ["+model.config.initializer_range=0.2"]),
    ("tiny_gpt2", "causal_lm", ["+model.config.initializer_range=0.2"]),
    ("tiny_t5", "seq2seq_lm", ["model.config.initializer_factor=3.0"]),
    ("tiny_bert", "seq_cls", []),
    ("tiny_llama", "seq_cls", []),
]
STEPS = 6


def inputs(method: str) -> dict:
    return {"task_ids": torch.tensor([0, 2])} if method == "multitask_prompt_tuning" else {}


def greedy(model, x: torch.Tensor, seq2seq: bool, **extra) -> torch.Tensor:
    """Greedy decoding by full forward passes (decoder inputs as embeddings for seq2seq)."""
    out = torch.zeros(x.shape[0], 1, dtype=torch.long) if seq2seq else x
    for _ in range(STEPS):
        if seq2seq:
            embeds = model.get_input_embeddings()(out)
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), decoder_inputs_embeds=embeds, **extra).logits
        else:
            logits = model(input_ids=out, attention_mask=torch.ones_like(out), **extra).logits
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


def same_until_eos(generated: torch.Tensor, expected: torch.Tensor, model, start: int) -> bool:
    """generate() stops a row at its end-of-sequence token and pads the rest; the reference
    decodes on, so rows are compared up to and including the first EOS generated after `start`."""
    eos = model.base_model.config.eos_token_id
    if generated.shape != expected.shape:
        return False
    for got, want in zip(generated.tolist(), expected.tolist()):
        end = got.index(eos, start) + 1 if eos in got[start:] else len(got)
        if got[:end] != want[:end]:
            return False
    return True


def row(model_name: str, task: str, method: str, extra: list[str], sharp: list[str]) -> list[str]:
    from peftc.errors import PeftcError
    from tests.helpers import build_base, max_diff, peft_pair, token_batch

    overrides = [f"model={model_name}", f"task={task}", f"peft={method}", *sharp, *extra]
    try:
        plan, ours, theirs = peft_pair(overrides)
    except PeftcError as exc:
        return [model_name, task, method, " ".join(extra), "refused", "", "", f"`{str(exc)[:70]}...`", "", ""]
    x = token_batch()
    mask = torch.ones_like(x)
    kwargs = {"attention_mask": mask, **inputs(method)}
    if task == "seq2seq_lm":
        kwargs["labels"] = token_batch(length=5, seed=1).contiguous()
    with torch.no_grad():
        actual = ours(input_ids=x, **kwargs).logits
        try:
            expected = theirs(input_ids=x, **kwargs).logits
            reference = "peft"
        except ValueError:  # "Model does not support past key values": build peft's cache ourselves
            n = plan.prompt.num_virtual_tokens
            extended = torch.cat([torch.ones(2, n, dtype=mask.dtype), mask], dim=1)
            expected = build_base(plan)(input_ids=x, attention_mask=extended, cache=theirs.get_prompt(2)).logits
            reference = "peft get_prompt (peft refuses)"
        diff = f"{max_diff(actual, expected):.1e}"
        ours_gen = peft_gen = "-"
        if task != "seq_cls":
            seq2seq = task == "seq2seq_lm"
            expected_tokens = greedy(theirs, x, seq2seq, **inputs(method))
            start = 1 if seq2seq else x.shape[1]
            ours_tokens = ours.generate(
                input_ids=x, attention_mask=mask, max_new_tokens=STEPS, do_sample=False, **inputs(method)
            )
            ours_gen = "yes" if same_until_eos(ours_tokens, expected_tokens, ours, start) else "NO"
            try:
                theirs_tokens = theirs.generate(
                    input_ids=x, attention_mask=mask, max_new_tokens=STEPS, do_sample=False, **inputs(method)
                )
                peft_gen = "yes" if same_until_eos(theirs_tokens, expected_tokens, ours, start) else "no"
            except Exception as exc:  # noqa: BLE001 (a report row, not a control path)
                peft_gen = f"fails ({type(exc).__name__})"
    peft_trainable = theirs.get_nb_trainable_parameters()[0]
    return [
        model_name,
        task,
        method,
        " ".join(extra),
        f"{plan.trainable_params:,}",
        f"{ours.trainable_parameters():,}",
        f"{peft_trainable:,}",
        f"{diff} vs {reference}",
        ours_gen,
        peft_gen,
    ]


def big_model_rows() -> list[list[str]]:
    import peftc

    shape = [
        "model=tiny_llama",
        "model.model_type=llama",
        "model.config.hidden_size=8192",
        "model.config.intermediate_size=28672",
        "model.config.num_hidden_layers=80",
        "model.config.num_attention_heads=64",
        "model.config.num_key_value_heads=8",
        "model.config.vocab_size=32000",
        "model.config.max_position_embeddings=4096",
        "+model.config.head_dim=128",
    ]
    rows = []
    for method, extra in (
        ("prompt_tuning", ["peft.num_virtual_tokens=20"]),
        ("prefix_tuning", ["peft.num_virtual_tokens=20"]),
        (
            "prefix_tuning",
            ["peft.num_virtual_tokens=20", "peft.prefix_projection=true", "peft.encoder_hidden_size=1024"],
        ),
        ("adaption_prompt", ["peft.adapter_layers=30"]),
    ):
        started = time.perf_counter()
        plan = peftc.compile([f"peft={method}", *shape, "model.name=70B", *extra])
        seconds = time.perf_counter() - started
        p = plan.prompt
        shapes = (
            f"token_dim {p.token_dim}, layers {p.num_layers}, heads {p.num_attention_heads}"
            if p
            else f"{len(plan.sites)} attention layers"
        )
        rows.append([method, " ".join(extra), shapes, f"{plan.trainable_params:,}", f"{seconds:.2f}"])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-70b", action="store_true")
    args = parser.parse_args()
    rows = [row(model, task, method, extra, sharp) for model, task, sharp in SETUPS for method, extra in METHODS]
    print(
        table(
            [
                "model",
                "task",
                "method",
                "options",
                "plan trainable",
                "materialized",
                "peft trainable",
                "max logit diff",
                "ours generate = greedy",
                "peft generate = greedy",
            ],
            rows,
        )
    )
    if not args.skip_70b:
        print()
        print(
            table(["method", "options", "derived shapes (70B GQA Llama)", "trainable", "compile s"], big_model_rows())
        )


if __name__ == "__main__":
    main()
