"""causal_lm puts the special tokens a tokenizer adds in front of a text (Llama's, Mistral's and
Gemma's BOS) where the base model was pretrained with them and is served with them: before each
document, each prompt/response example and each prompt it continues. A chat template writes its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

import peftc
from peftc import tasks
from peftc.planning.model_source import load_tokenizer
from peftc.tasks.common import leading_special_tokens


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return load_tokenizer(peftc.compile([]).spec.model)  # the byte tokenizer: "<s> text </s>"


def _without_post_processor(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> PreTrainedTokenizerFast:
    """The same vocabulary with no special tokens added to a text (as GPT-2's and Qwen's)."""
    tokenizer.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    return PreTrainedTokenizerFast.from_pretrained(tmp_path)


def test_the_leading_special_tokens_are_the_ones_the_tokenizer_adds(tokenizer, tmp_path: Path) -> None:
    assert leading_special_tokens(tokenizer) == [tokenizer.bos_token_id]  # not the trailing EOS
    assert leading_special_tokens(_without_post_processor(tokenizer, tmp_path)) == []


@pytest.mark.parametrize("layout", ["text", "prompt_response"])
def test_every_example_starts_with_the_bos_the_model_was_pretrained_with(tokenizer, tmp_path: Path, layout) -> None:
    rows = [{"text": f"the owl {i} sleeps.", "prompt": f"Q{i}?", "response": " yes"} for i in range(20)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    plan = peftc.compile(
        ["data.source=jsonl", f"data.path={path}", f"data.format={layout}", "task.packing=false"]
        + (["+data.columns.text=text"] if layout == "text" else [])
    )
    train, _ = tasks.get(plan.task).datasets(plan.spec, tokenizer)
    for example in train:
        ids = example["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1


def test_a_prompt_is_continued_after_the_bos_and_a_conversation_as_its_template_writes_it(tokenizer) -> None:
    plan = peftc.compile(["model=demo_llama"])
    task = tasks.get(plan.task)
    prompts: list[list[int]] = []

    class Model:
        def parameters(self):  # noqa: ANN202
            return iter([torch.zeros(1)])

        def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: ANN003
            prompts.append(input_ids[0].tolist())
            return input_ids

    rows = [{"text": "The owl"}, {"messages": [{"role": "user", "content": "Hi"}]}]
    task.predict(Model(), rows, tokenizer, plan.spec)
    text, conversation = prompts
    assert text == [tokenizer.bos_token_id, *tokenizer("The owl", add_special_tokens=False)["input_ids"]]
    assert tokenizer.bos_token_id not in conversation  # demo_llama's template writes none
