"""data.format=prompt_response for causal_lm: the loss covers the response (the prompt is masked
unless task.train_on_prompt), and packing never splits an example."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import peftc
from peftc import tasks
from peftc.planning.model_source import load_tokenizer
from peftc.tasks.common import IGNORE_INDEX
from tests.helpers import run_cli

ROWS = [{"prompt": f"Q{i}: what does the cat say? A:", "response": f" meow {i}."} for i in range(24)]


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def examples(qa_file: Path, *overrides: str) -> tuple[list, object, object]:
    plan = peftc.compile(["data.source=jsonl", f"data.path={qa_file}", "data.format=prompt_response", *overrides])
    tokenizer = load_tokenizer(plan.spec.model)
    task = tasks.get(plan.task)
    train, _ = task.datasets(plan.spec, tokenizer)
    return train, task, tokenizer


def test_the_prompt_is_masked_and_the_response_with_its_eos_is_trained(qa_file: Path) -> None:
    train, task, tokenizer = examples(qa_file, "task.packing=false")
    batch = task.collate(train[:4], tokenizer)
    for row, ids, labels in zip(train[:4], batch["input_ids"].tolist(), batch["labels"].tolist()):
        assert ids[0] == tokenizer.bos_token_id, "the BOS the tokenizer adds, as the base was pretrained"
        text = tokenizer.decode(row["input_ids"][1:])
        prompt = next(r["prompt"] for r in ROWS if text.startswith(r["prompt"]))
        cut = 1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        trained = [t for t in labels if t != IGNORE_INDEX]
        assert labels[:cut] == [IGNORE_INDEX] * cut
        assert trained == ids[cut : cut + len(trained)] and trained[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(trained, skip_special_tokens=True) == text[len(prompt) :].removesuffix("</s>")


def test_train_on_prompt_trains_every_token(qa_file: Path) -> None:
    train, task, tokenizer = examples(qa_file, "task.packing=false", "task.train_on_prompt=true")
    assert all(example["labels"] == example["input_ids"] for example in train)


def test_truncation_cuts_the_labels_with_the_tokens(qa_file: Path) -> None:
    """data.max_length=32 cuts into each response (a prompt is ~30 tokens): the labels stay
    aligned with the tokens they predict, the prompt still masked."""
    train, _, tokenizer = examples(qa_file, "task.packing=false", "data.max_length=32")
    assert any(len(tokenizer(r["prompt"] + r["response"])["input_ids"]) + 1 > 32 for r in ROWS)
    for example in train:
        ids, labels = example["input_ids"], example["labels"]
        assert len(labels) == len(ids) <= 32
        assert all(label in (token, IGNORE_INDEX) for token, label in zip(ids, labels))


def test_packing_fills_a_block_exactly_before_starting_the_next() -> None:
    from peftc.tasks.causal_lm import _pack_whole

    example = {"input_ids": [1, 2, 3, 4], "labels": [IGNORE_INDEX, IGNORE_INDEX, 3, 4]}
    blocks = _pack_whole([example] * 3, 8)
    assert [len(b["input_ids"]) for b in blocks] == [8, 4]
    assert blocks[0]["labels"] == example["labels"] * 2


def test_packing_puts_whole_examples_into_blocks(qa_file: Path) -> None:
    unpacked, _, _ = examples(qa_file, "task.packing=false", "data.max_length=128")
    packed, _, _ = examples(qa_file, "data.max_length=128")
    assert len(packed) < len(unpacked) and all(len(b["input_ids"]) <= 128 for b in packed)
    # each block is consecutive whole examples, in order, and every example is in one block
    pending = iter(unpacked)
    for block in packed:
        ids, labels = [], []
        while len(ids) < len(block["input_ids"]):
            example = next(pending)
            ids, labels = ids + example["input_ids"], labels + example["labels"]
        assert (ids, labels) == (block["input_ids"], block["labels"])
    assert next(pending, None) is None


def test_the_cli_trains_on_prompt_response_rows_and_refuses_the_format_elsewhere(qa_file: Path, tmp_path: Path) -> None:
    args = ["data.source=jsonl", f"data.path={qa_file}", "data.format=prompt_response", "trainer.max_steps=2"]
    result = run_cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sample after training: 'Q" in result.stdout  # the prompt is what gets continued
    refused = run_cli(["task=seq_cls", "data.format=prompt_response", f"hydra.run.dir={tmp_path / 'no'}"], cwd=tmp_path)
    assert refused.returncode == 2 and "data.format='prompt_response': is read by task=causal_lm only" in refused.stderr
    assert not (tmp_path / "no").exists()


def test_the_built_in_instructions_are_prompt_response_rows() -> None:
    plan = peftc.compile(["data=instructions"])
    assert plan.spec.data.format == "prompt_response"
    tokenizer = load_tokenizer(plan.spec.model)
    train, val = tasks.get(plan.task).datasets(plan.spec, tokenizer)
    assert train and val
    for block in train[:3]:
        trained = tokenizer.decode([t for t in block["labels"] if t != IGNORE_INDEX], skip_special_tokens=True)
        assert "Question:" not in trained and trained.startswith(" ") and trained.rstrip().endswith(".")


def test_truncation_keeps_the_start_of_each_example(qa_file: Path) -> None:
    """An example longer than data.max_length loses the end of its response, never its prompt."""
    train, _, tokenizer = examples(qa_file, "task.packing=false", "data.max_length=32")
    for example in train:
        text = tokenizer.decode(example["input_ids"][1:])  # after the BOS
        assert any((row["prompt"] + row["response"]).startswith(text) for row in ROWS), text


def test_an_example_whose_prompt_fills_max_length_is_named(qa_file: Path) -> None:
    """Its response is cut off entirely: nothing to learn from, which the run says instead of training on nothing."""
    with pytest.raises(peftc.DataError, match=r"\(train split, example 1\): has no token to learn from within"):
        examples(qa_file, "task.packing=false", "data.max_length=16")


def test_padding_of_examples_that_carry_their_own_labels_is_never_a_target() -> None:
    task = tasks.get("causal_lm")
    tokenizer = load_tokenizer(peftc.compile([]).spec.model)
    examples = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8, 9], "labels": [IGNORE_INDEX, 9]},
    ]
    batch = task.collate(examples, tokenizer, pad_to=4)
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 6, 7, IGNORE_INDEX],
        [IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX],
    ]


@pytest.mark.parametrize(
    ("model", "extra"),
    [("tiny_llama", []), ("tiny_gpt2", []), ("tiny_llama", ["task.train_on_prompt=true"])],
    ids=["llama", "gpt2", "llama-train_on_prompt"],
)
def test_packed_examples_train_as_they_would_alone(qa_file: Path, model: str, extra: list[str]) -> None:
    """A block's summed loss is the sum of its examples' losses, each computed alone: no token
    attends to another example, positions restart, and no example predicts the next one's start."""
    import torch

    from peftc.training.loaders import dataloaders

    overrides = [f"model={model}", "data.max_length=128", *extra]
    plan = peftc.compile(["data.source=jsonl", f"data.path={qa_file}", "data.format=prompt_response", *overrides])
    tokenizer = load_tokenizer(plan.spec.model)
    task = tasks.get(plan.task)
    collate = dataloaders(plan, tokenizer)[0].collate_fn
    packed, _, _ = examples(qa_file, *overrides)
    unpacked, _, _ = examples(qa_file, "task.packing=false", *overrides)
    block, members, filled = packed[0], [], 0
    for example in unpacked:  # the examples the first block holds, in order
        if filled == len(block["input_ids"]):
            break
        members.append(example)
        filled += len(example["input_ids"])
    assert len(members) > 1, "the block must hold several examples"
    network = peftc.materialize(plan).eval()
    with torch.no_grad():
        together = task.validation_stats(network, collate([block]))
        apart = [task.validation_stats(network, collate([example])) for example in members]
    assert int(together["tokens"]) == sum(int(s["tokens"]) for s in apart)
    expected = sum(float(s["loss_sum"]) for s in apart)
    assert float(together["loss_sum"]) == pytest.approx(expected, rel=1e-5)


def test_prompt_learning_keeps_one_mask_per_packed_block(qa_file: Path) -> None:
    """Virtual tokens are every packed example's context: no position restarts for them."""
    from peftc.training.loaders import dataloaders

    plan = peftc.compile(
        ["data.source=jsonl", f"data.path={qa_file}", "data.format=prompt_response", "peft=prompt_tuning"]
    )
    batch = next(iter(dataloaders(plan, load_tokenizer(plan.spec.model))[0]))
    assert "attention_mask" in batch and "position_ids" not in batch
