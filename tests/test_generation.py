"""task.generation.* reaches transformers' generate() for predictions: beam search as transformers
does it, sampling seeded by the run's seed (a prediction repeats), settings that only apply to
sampling refused without it."""

from __future__ import annotations

import pytest
import torch

import peftc
from peftc import tasks
from peftc.planning.model_source import load_tokenizer

PROMPT = [{"text": "The golden goat walked to the lake in the evening."}]


def predict(*overrides: str) -> str:
    plan = peftc.compile(list(overrides))
    model = peftc.materialize(plan).eval()
    tokenizer = load_tokenizer(plan.spec.model)
    return tasks.get(plan.task).predict(model, PROMPT, tokenizer, plan.spec)[0]["generated"]


def test_beam_search_is_transformers_beam_search() -> None:
    plan = peftc.compile([])
    from tests.helpers import build_base

    base = build_base(plan).eval()
    tokenizer = load_tokenizer(plan.spec.model)
    ids = torch.tensor([tokenizer(PROMPT[0]["text"], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = base.generate(input_ids=ids, max_new_tokens=48, num_beams=3, do_sample=False, pad_token_id=0)
    assert predict("task.generation.num_beams=3") == tokenizer.decode(
        expected[0, ids.shape[1] :], skip_special_tokens=True
    )


def test_sampling_is_seeded_by_the_run() -> None:
    sampling = ("task.generation.do_sample=true", "task.generation.temperature=1.5")
    first, again = predict(*sampling), predict(*sampling)
    assert first == again
    assert predict(*sampling, "seed=1") != first
    assert predict() != first  # greedy by default


@pytest.mark.parametrize("key", ["temperature=0.7", "top_p=0.9", "top_k=5"])
def test_sampling_settings_without_sampling_are_refused(key: str) -> None:
    with pytest.raises(peftc.ConfigError, match="only applies when sampling; add task.generation.do_sample=true"):
        peftc.compile([f"task.generation.{key}"])


class EchoModel:
    """Generates the given texts (the tokens a real model would produce), one batch at a time."""

    def __init__(self, tokenizer, outputs: list[str]) -> None:
        self.tokenizer, self.outputs = tokenizer, list(outputs)

    def generate(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        texts, self.outputs = self.outputs[: len(input_ids)], self.outputs[len(input_ids) :]
        return self.tokenizer(texts, padding=True, return_tensors="pt")["input_ids"]


def test_seq2seq_bleu_summed_over_batches_is_sacrebleus_corpus_bleu() -> None:
    from sacrebleu.metrics import BLEU

    plan = peftc.compile(["task=seq2seq_lm", "model=tiny_t5", "task.eval_with_generate=true"])
    task, tokenizer = tasks.get(plan.task), load_tokenizer(plan.spec.model)
    targets = [f"the {w} sat on the mat by the door" for w in ("cat", "dog", "owl", "fox", "hen", "elk")]
    generated = [targets[0], "the dog sat by the door", "an owl", targets[3], "the hen sat on a mat", "elk"]
    examples = task.encode([{"source": "x", "target": t} for t in targets], plan.spec, tokenizer)
    model, totals = EchoModel(tokenizer, generated), {}
    for chunk in (examples[:4], examples[4:]):  # two batches of different sizes
        stats = task.generation_stats(model, task.collate(chunk, tokenizer), plan.spec.task, tokenizer)
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    metrics = task.metrics({**totals, "loss_sum": 1.0, "tokens": 1.0})
    assert metrics["val_bleu"] == pytest.approx(BLEU().corpus_score(generated, [targets]).score, abs=1e-9)
    assert 20 < metrics["val_bleu"] < 90 and metrics["val_exact_match"] == pytest.approx(2 / 6)


def test_seq2seq_eval_with_generate_reports_bleu_and_leaves_plain_eval_unchanged(tmp_path) -> None:
    from tests.helpers import run_cli

    common = ["action=eval", "task=seq2seq_lm", "model=tiny_t5", "data.limit_val_examples=6", "task.max_new_tokens=4"]
    plain = run_cli([*common, f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path)
    scored = run_cli([*common, "task.eval_with_generate=true", f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path)
    assert plain.returncode == 0 and scored.returncode == 0, plain.stderr + scored.stderr
    assert "val_bleu" not in plain.stdout and "val_bleu=" in scored.stdout and "val_exact_match=" in scored.stdout
