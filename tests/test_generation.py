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
