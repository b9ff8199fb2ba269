"""Extractive question answering as a user of transformers' run_qa and the squad metric expects it:
a long context is cut into overlapping windows (doc_stride) that each train, each example is
answered and scored once over all its windows, and a prediction scores against the best of its
row's gold answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from peftc import tasks
from peftc.config.compose import compose, to_spec
from peftc.errors import ConfigError, DataError
from peftc.planning.model_source import load_tokenizer
from peftc.tasks.qa_spans import best_gold_scores

QA = tasks.get("question_ans")
EIFFEL = "The tower was built by Gustave Eiffel in 1889."
FAR = "Nothing here. " * 20 + "It is in Paris."


def qa_run(*overrides: str) -> tuple[Any, Any]:
    run = to_spec(compose(["task=question_ans", "model=tiny_bert", *overrides]))
    return run, load_tokenizer(run.model)


class Pointer(torch.nn.Module):
    """A stand-in model: start and end point at the first place an input holds `target`'s tokens."""

    def __init__(self, tokenizer: Any, target: str) -> None:
        super().__init__()
        self.target = tokenizer(target, add_special_tokens=False)["input_ids"]
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        start, end = torch.zeros(input_ids.shape), torch.zeros(input_ids.shape)
        width = len(self.target)
        for row, ids in enumerate(input_ids.tolist()):
            found = next((i for i in range(len(ids) - width + 1) if ids[i : i + width] == self.target), None)
            if found is not None:
                start[row, found], end[row, found + width - 1] = 5.0, 5.0
        return type("Out", (), {"start_logits": start, "end_logits": end})()


def squad_row(context: str, *answers: str, question: str = "Who built it?") -> dict[str, Any]:
    starts = [context.index(answer) for answer in answers]
    return {"question": question, "context": context, "answer": {"text": list(answers), "answer_start": starts}}


def scores(model: torch.nn.Module, examples: list, tokenizer: Any) -> dict[str, float]:
    stats = QA.validation_stats(model, QA.collate(examples, tokenizer))
    return {key: float(value) for key, value in stats.items()}


# ------------------------------------------------------------------------ several gold answers
@pytest.mark.parametrize(
    ("predicted", "golds", "exact", "f1"),
    [
        ("Eiffel", ("Gustave Eiffel", "Eiffel"), 1.0, 1.0),  # the second gold answer, matched exactly
        ("Gustave", ("Gustave Eiffel", "Eiffel"), 0.0, 2 / 3),  # 7 of 14 tokens: P = 1, R = 1/2
        ("Eiffel", ("Gustave Eiffel",), 0.0, 0.6),  # 6 of 14 tokens: P = 1, R = 3/7
    ],
)
def test_a_prediction_scores_against_the_best_of_its_rows_gold_answers(
    predicted: str, golds: tuple, exact: float, f1: float
) -> None:
    """As the squad metric scores it: exact match and F1 each at their best over the gold answers."""
    run, tokenizer = qa_run()
    examples = QA.encode([squad_row(EIFFEL, *golds)], run, tokenizer)
    assert scores(Pointer(tokenizer, predicted), examples, tokenizer) == pytest.approx(
        {"exact": exact, "f1": f1, "count": 1}
    )


def test_best_gold_scores_take_exact_match_and_f1_each_at_its_best_and_skip_missing_golds() -> None:
    starts, ends = torch.tensor([3, 3, 3]), torch.tensor([5, 5, 5])
    gold = torch.tensor(
        [
            [[3, 4], [4, 6]],  # F1 0.8 (overlap 2: P 2/3, R 1) beats 2/3 (P 2/3, R 2/3); no exact match
            [[9, 9], [3, 5]],  # the second gold is matched exactly
            [[-1, -1], [-1, -1]],  # no gold span: a miss
        ]
    )
    exact, f1 = best_gold_scores(starts, ends, gold)
    assert exact.tolist() == [0.0, 1.0, 0.0]
    assert f1.tolist() == pytest.approx([0.8, 1.0, 0.0])


def test_training_learns_the_first_answer_and_validation_keeps_them_all() -> None:
    run, tokenizer = qa_run()
    [example] = QA.encode([squad_row(EIFFEL, "Gustave Eiffel", "Eiffel", "Gustave")], run, tokenizer)
    [window] = example["windows"]
    first = EIFFEL.index("Gustave")
    assert (window["start_positions"], window["end_positions"]) == (
        window["offsets"].index((first, first + 1)),
        window["offsets"].index((first + 13, first + 14)),
    )
    assert example["gold_spans"] == [[first, first + 13], [first + 8, first + 13], [first, first + 6]]


@pytest.mark.parametrize(("longest", "exact"), [(30, 1.0), (10, 0.0)])
def test_validation_scores_the_span_a_prediction_would_give(longest: int, exact: float) -> None:
    """Both cap the span at task.max_answer_tokens (as run_qa's post-processing): a 14-token answer
    the model points at is out of reach with a cap of 10, in the metrics as in the prediction."""
    run, tokenizer = qa_run(f"task.max_answer_tokens={longest}")
    model = Pointer(tokenizer, "Gustave Eiffel")
    examples = QA.encode([squad_row(EIFFEL, "Gustave Eiffel")], run, tokenizer)
    stats = QA.validation_stats(model, QA.collate(examples, tokenizer), run.task)
    [prediction] = QA.predict(model, [{"question": "Who built it?", "context": EIFFEL}], tokenizer, run)
    assert float(stats["exact"]) == exact
    assert (prediction["answer"] == "Gustave Eiffel") == bool(exact)


# ------------------------------------------------------------------------------ long contexts
def test_validation_scores_each_example_once_on_its_best_window() -> None:
    """The answer is in the last of many windows: found there, and the example counts once."""
    run, tokenizer = qa_run("data.max_length=64")
    rows = [squad_row(FAR, "Paris", question="Where?"), squad_row(EIFFEL, "Gustave Eiffel")]
    examples = QA.encode(rows, run, tokenizer)
    assert len(examples[0]["windows"]) > 2 and len(examples[1]["windows"]) == 1
    model = Pointer(tokenizer, "Paris")
    together = scores(model, examples, tokenizer)
    alone = [scores(model, [example], tokenizer) for example in examples]
    assert together == {"exact": 1.0, "f1": 1.0, "count": 2}
    assert together == {key: sum(a[key] for a in alone) for key in together}  # however the split is batched


def test_prediction_answers_each_example_from_its_best_window() -> None:
    run, tokenizer = qa_run("data.max_length=64")
    rows = [{"question": "Where?", "context": FAR}, {"question": "Who?", "context": EIFFEL}]
    predictions = QA.predict(Pointer(tokenizer, "Paris"), rows, tokenizer, run)
    assert len(predictions) == 2
    assert (predictions[0]["answer"], predictions[0]["start"], predictions[0]["end"]) == (
        "Paris",
        FAR.index("Paris"),
        FAR.index("Paris") + 5,
    )


def test_each_window_is_a_training_example_labelled_with_the_answer_or_position_0(tmp_path: Path) -> None:
    """As run_qa trains: every window of a long context, the ones without the answer pointing at
    position 0; a short context is one example, as before windowing."""
    rows = [squad_row(FAR, "Paris", question="Where?"), squad_row(EIFFEL, "Gustave Eiffel")]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    run, tokenizer = qa_run("data.source=jsonl", f"data.path={path}", "data.val_fraction=0", "data.max_length=64")
    train, _ = QA.datasets(run, tokenizer)
    labels = [(w["start_positions"], w["end_positions"]) for w in train]
    paris, eiffel = labels[-2], labels[-1]
    assert len(train) > 3 and labels[:-2] == [(0, 0)] * (len(train) - 2)
    assert (train[-2]["offsets"][paris[0]][0], train[-2]["offsets"][paris[1]][1]) == (FAR.index("Paris"), len(FAR) - 1)
    assert (train[-1]["offsets"][eiffel[0]][0], train[-1]["offsets"][eiffel[1]][1]) == (23, 37)


# ------------------------------------------------------------- parity with transformers' overflow
QUESTION = "Who built the tower ?"
CONTEXT = (
    "In 1889 the tower was built by Gustave Eiffel for the fair in Paris , and it still stands by "
    "the river Seine where many people visit it every year ."
)


def word_tokenizer(text: str) -> Any:
    """A fast word-level tokenizer with BERT's pair template ([CLS] q [SEP] c [SEP]): tokens of
    several characters, so windows, offsets and labels are not the byte tokenizer's one per character."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *sorted(set(text.split()))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def run_qa_label(encoding: Any, window: int, start_char: int, end_char: int) -> tuple[int, int]:
    """run_qa's training label of one window, restated: the CLS position unless the window's
    context holds the whole answer; else the last context token starting at or before the answer's
    start and the first one ending at or after the answer's end."""
    offsets = encoding["offset_mapping"][window]
    context = [i for i, sequence in enumerate(encoding.sequence_ids(window)) if sequence == 1]
    if offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return encoding["input_ids"][window].index(encoding.tokenizer.cls_token_id), 0
    first = max(i for i in context if offsets[i][0] <= start_char)
    last = min(i for i in context if offsets[i][1] >= end_char)
    return first, last


@pytest.mark.filterwarnings("ignore:.*have their answer in no single window")  # Gustave Eiffel, doc_stride 0
@pytest.mark.parametrize("stride", [0, 3, 6])
@pytest.mark.parametrize("answer", ["1889", "Gustave Eiffel", "the river Seine", "every year ."])
def test_windows_and_labels_are_transformers_overflow_labelled_as_run_qa_labels_them(stride: int, answer: str) -> None:
    tokenizer = word_tokenizer(QUESTION + " " + CONTEXT)
    run, _ = qa_run("data.max_length=16", f"task.doc_stride={stride}")
    [example] = QA.encode([squad_row(CONTEXT, answer, question=QUESTION)], run, tokenizer)
    reference = tokenizer(
        QUESTION,
        CONTEXT,
        truncation="only_second",
        max_length=16,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    reference.tokenizer = tokenizer
    windows = example["windows"]
    assert len(windows) > 2 and [w["input_ids"] for w in windows] == reference["input_ids"]
    start_char = CONTEXT.index(answer)
    labels = [(w["start_positions"], w["end_positions"]) for w in windows]
    expected = [run_qa_label(reference, i, start_char, start_char + len(answer)) for i in range(len(windows))]
    assert labels == expected
    # context positions: each window's context tokens are the context's own, where their shift puts them
    context_ids = tokenizer(CONTEXT, add_special_tokens=False)["input_ids"]
    for window in windows:
        for position, (token, flag) in enumerate(zip(window["input_ids"], window["context_mask"])):
            assert not flag or context_ids[position + window["context_shift"]] == token
    [[first, last]] = example["gold_spans"]
    assert tokenizer.decode(context_ids[first : last + 1]) == answer


@pytest.mark.parametrize(
    ("question", "shared"),
    [
        ("Who?", 16),  # a third of data.max_length=48, as run_qa's 128 of 384
        ("Who wrote the letter to her?", 8),  # the question takes 31 of 48 tokens: half of the 17 left
    ],
)
def test_windows_share_a_third_of_max_length_unless_the_question_leaves_less_room(question: str, shared: int) -> None:
    run, tokenizer = qa_run("data.max_length=48")
    [example] = QA.encode([{"question": question, "context": "word " * 60}], run, tokenizer)
    slices = [[o for o, m in zip(w["offsets"], w["context_mask"]) if m] for w in example["windows"]]
    assert {len(set(before) & set(after)) for before, after in zip(slices, slices[1:])} == {shared}


@pytest.mark.parametrize(
    ("overrides", "question", "message"),
    [
        (
            ["data.max_length=16"],
            "Who wrote the letter to her?",
            r"^example 1 \(question 'Who wrote the letter to her\?'\): the question \(with the special tokens\) takes 31 tokens, leaving no "
            r"room for the context in data.max_length=16; raise data.max_length or shorten the question$",
        ),
        (
            ["data.max_length=32", "task.doc_stride=10"],
            "Who wrote the letter?",
            r"^example 1 \(question 'Who wrote the letter\?'\): task.doc_stride=10 is not less than the 8 context tokens a window of "
            r"data.max_length=32 holds beside this question, .*; lower task.doc_stride below 8",
        ),
    ],
)
def test_a_question_that_leaves_a_window_no_room_is_refused_by_example(
    overrides: list, question: str, message: str
) -> None:
    run, tokenizer = qa_run(*overrides)
    with pytest.raises(DataError, match=message):
        QA.encode([{"question": question, "context": "word " * 60}], run, tokenizer)


def test_a_doc_stride_not_below_max_length_is_refused_at_compose() -> None:
    with pytest.raises(ConfigError, match=r"task.doc_stride.*must be less than data.max_length=64") as caught:
        qa_run("data.max_length=64", "task.doc_stride=64")
    assert caught.value.key == "task.doc_stride"


def test_a_context_that_fits_is_one_window_encoded_as_the_pair_was_before_windowing() -> None:
    """Short contexts train on exactly what they trained on before: one truncated pair encoding."""
    run, tokenizer = qa_run("data.max_length=64")
    [example] = QA.encode([squad_row(EIFFEL, "Gustave Eiffel")], run, tokenizer)
    pair = tokenizer("Who built it?", EIFFEL, truncation="only_second", max_length=64, return_offsets_mapping=True)
    [window] = example["windows"]
    assert window["input_ids"] == pair["input_ids"] and window["offsets"] == pair["offset_mapping"]
    assert window["context_mask"] == [int(sequence == 1) for sequence in pair.sequence_ids()]


def test_a_slow_tokenizer_is_refused_naming_what_would_work() -> None:
    """Offsets and overflowing windows are fast-tokenizer features (transformers' slow ones lack them)."""
    run, _ = qa_run()
    slow = type("SlowTokenizer", (), {"is_fast": False})()
    with pytest.raises(ConfigError, match=r"model.tokenizer.*SlowTokenizer.*needs a fast tokenizer.*tokenizer.json"):
        QA.encode([{"question": "Who?", "context": EIFFEL}], run, slow)
