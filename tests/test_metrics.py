"""Task metrics on hand-made examples with known answers, and exact aggregation over batches."""

from __future__ import annotations

import math

import pytest
import torch

from peftc import tasks
from peftc.tasks.common import IGNORE_INDEX, classification_metrics, classification_stats, label_index


def summed(*stats: dict[str, torch.Tensor]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for part in stats:
        for key, value in part.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def test_accuracy_and_macro_f1_match_hand_computed_values() -> None:
    pred = torch.tensor([0, 0, 1, 1, 2])
    gold = torch.tensor([0, 1, 1, 1, 2])
    metrics = classification_metrics(summed(classification_stats(pred, gold, 3)), 3)
    # class 0: TP1 FP1 FN0 -> 2/3; class 1: TP2 FP0 FN1 -> 4/5; class 2: TP1 -> 1
    assert metrics["val_accuracy"] == pytest.approx(4 / 5)
    assert metrics["val_macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)


def test_macro_f1_skips_classes_that_never_occur_and_ignored_positions() -> None:
    pred = torch.tensor([1, 1, 0, 2])
    gold = torch.tensor([1, 0, IGNORE_INDEX, IGNORE_INDEX])
    metrics = classification_metrics(summed(classification_stats(pred, gold, 4)), 4)
    # kept: (1,1) and (1,0). class 1: TP1 FP1 -> 2/3; class 0: FN1 -> 0; classes 2, 3 absent
    assert metrics["val_accuracy"] == pytest.approx(1 / 2)
    assert metrics["val_macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_classification_metrics_are_the_same_however_the_split_is_batched() -> None:
    generator = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 3, (37,), generator=generator)
    gold = torch.randint(0, 3, (37,), generator=generator)
    whole = classification_metrics(summed(classification_stats(pred, gold, 3)), 3)
    parts = [classification_stats(p, g, 3) for p, g in zip(pred.split(5), gold.split(5))]
    assert classification_metrics(summed(*parts), 3) == pytest.approx(whole)


def test_seq_cls_metrics_from_logits() -> None:
    task = tasks.get("seq_cls")

    class Fixed(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, **_: object) -> object:
            logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
            return type("Out", (), {"logits": logits})()

    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "labels": torch.tensor([0, 1, 1, 1])}
    metrics = task.metrics(summed(task.validation_stats(Fixed(), batch)))
    # predictions 0, 1, 0, 1 -> 3 of 4 right; class 0: TP1 FP1 -> 2/3; class 1: TP2 FN1 -> 4/5
    assert metrics == pytest.approx({"val_accuracy": 0.75, "val_macro_f1": (2 / 3 + 4 / 5) / 2})


def test_seq_cls_predicts_the_most_probable_label_with_each_rows_probabilities() -> None:
    from peftc.config.compose import compose, to_spec
    from peftc.planning.model_source import load_tokenizer

    run = to_spec(compose(["task=seq_cls", "model=tiny_bert", "task.labels=[negative,positive]"]))
    task = tasks.get("seq_cls")

    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids: torch.Tensor, **_: object) -> object:
            return type("Out", (), {"logits": torch.tensor([[0.0, 2.0], [1.0, 0.0]])})()

    predictions = task.predict(Fixed(), [{"text": "good"}, {"text": "bad"}], load_tokenizer(run.model), run)
    assert [p["label"] for p in predictions] == ["positive", "negative"]
    assert predictions[0]["scores"] == pytest.approx(
        {"negative": 1 / (1 + math.e**2), "positive": 1 / (1 + math.e**-2)}
    )


def test_seq_cls_predicts_a_sentence_pair_from_both_its_texts() -> None:
    from peftc.config.compose import compose, to_spec
    from peftc.planning.model_source import load_tokenizer

    run = to_spec(compose(["task=seq_cls", "model=tiny_bert", "task.labels=[no,yes]"]))
    tokenizer = load_tokenizer(run.model)
    seen = []

    class Recording(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids: torch.Tensor, **_: object) -> object:
            seen.extend(input_ids.tolist())
            return type("Out", (), {"logits": torch.zeros(len(input_ids), 2)})()

    row = {"text": "Is it red?", "text_pair": "It is red."}
    [prediction] = tasks.get("seq_cls").predict(Recording(), [row], tokenizer, run)
    assert seen == [tokenizer("Is it red?", "It is red.")["input_ids"]]
    assert prediction["text_pair"] == "It is red."


def test_seq2seq_perplexity_is_exp_of_mean_target_token_loss() -> None:
    task = tasks.get("seq2seq_lm")
    vocab = 5
    logits = torch.log_softmax(torch.randn(2, 3, vocab, generator=torch.Generator().manual_seed(1)), -1)
    labels = torch.tensor([[1, 2, IGNORE_INDEX], [3, IGNORE_INDEX, IGNORE_INDEX]])

    class Fixed(torch.nn.Module):
        def forward(self, **_: object) -> object:
            return type("Out", (), {"logits": logits})()

    stats = [
        task.validation_stats(Fixed(), {"labels": labels}),
    ]
    metrics = task.metrics(summed(*stats))
    expected = -(logits[0, 0, 1] + logits[0, 1, 2] + logits[1, 0, 3]) / 3
    assert metrics["val_loss"] == pytest.approx(float(expected), rel=1e-6)
    assert metrics["val_perplexity"] == pytest.approx(math.exp(float(expected)), rel=1e-6)


def test_causal_lm_perplexity_weighs_every_token_the_same_however_the_split_is_batched() -> None:
    """val_loss is the mean over all counted tokens of the split (transformers' loss on the whole
    split as one batch), not a mean of per-batch means: rows of 4, 8 and 13 tokens."""
    import peftc
    from tests.helpers import build_base

    task = tasks.get("causal_lm")
    model = build_base(peftc.compile(["model=tiny_llama"])).eval()
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 260, (length,), generator=generator) for length in (4, 8, 13)]
    ids = torch.zeros(3, 13, dtype=torch.long)
    labels = torch.full((3, 13), IGNORE_INDEX)
    mask = torch.zeros(3, 13, dtype=torch.long)
    for i, row in enumerate(rows):  # right padding, ignored
        ids[i, : len(row)], labels[i, : len(row)], mask[i, : len(row)] = row, row, 1
    with torch.no_grad():
        whole = task.metrics(
            summed(task.validation_stats(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}))
        )
        one_by_one = task.metrics(
            summed(*(task.validation_stats(model, {"input_ids": r[None], "labels": r[None]}) for r in rows))
        )
        expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert whole["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert one_by_one["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert one_by_one["val_perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_seq2seq_loss_is_the_same_with_targets_of_other_lengths_in_the_batch() -> None:
    """Targets shorter than the batch's longest are padded with ignored labels: a batch of two
    rows scores what the two rows score alone (padding never counts as a target token)."""
    import peftc
    from peftc.planning.model_source import load_tokenizer
    from tests.helpers import build_base

    plan = peftc.compile(["task=seq2seq_lm", "model=tiny_t5"])
    task, tokenizer = tasks.get("seq2seq_lm"), load_tokenizer(plan.spec.model)
    model = build_base(plan).eval()
    rows = [
        {"source": "translate: the cat sat", "target": "le chat"},
        {"source": "a b", "target": "un deux trois quatre"},
    ]
    examples = task.encode(rows, plan.spec, tokenizer)
    assert len(examples[0]["labels"]) < len(examples[1]["labels"])
    with torch.no_grad():
        together = summed(task.validation_stats(model, task.collate(examples, tokenizer)))
        alone = summed(*(task.validation_stats(model, task.collate([e], tokenizer)) for e in examples))
    assert together["tokens"] == alone["tokens"] == sum(len(e["labels"]) for e in examples)
    assert together["loss_sum"] == pytest.approx(alone["loss_sum"], rel=1e-5)


def test_seq2seq_targets_are_cut_at_max_target_length_and_sources_at_max_length() -> None:
    from peftc.config.compose import compose, to_spec
    from peftc.planning.model_source import load_tokenizer

    run = to_spec(compose(["task=seq2seq_lm", "model=tiny_t5", "task.max_target_length=6", "data.max_length=10"]))
    row = {"source": "a source longer than ten tokens", "target": "a target longer than six tokens"}
    [example] = tasks.get("seq2seq_lm").encode([row], run, load_tokenizer(run.model))
    assert (len(example["input_ids"]), len(example["labels"])) == (10, 6)


def test_causal_lm_loss_from_full_logits_counts_only_the_labelled_next_tokens() -> None:
    """A model whose head the chunked loss cannot use (here it exposes none) is scored from its
    logits: positions 0..T-2 predict labels 1..T-1 and an ignored label is neither summed nor counted."""
    from peftc.tasks.lm_loss import next_token_loss

    logits = torch.log_softmax(torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(2)), -1)

    class Fixed(torch.nn.Module):
        def forward(self, **_: object) -> object:
            return type("Out", (), {"logits": logits})()

    labels = torch.tensor([[1, 2, IGNORE_INDEX, 3]])
    total, tokens = next_token_loss(Fixed(), {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": labels})
    assert tokens.item() == 2
    assert total.item() == pytest.approx(-(logits[0, 0, 2] + logits[0, 2, 3]).item(), rel=1e-6)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("positive", 1), ("negative", 0), (1, 1), ("0", 0), (2, None), ("neutral", None), (True, None), (-1, None)],
)
def test_labels_are_names_or_indices(value: object, expected: int | None) -> None:
    assert label_index(value, ["negative", "positive"]) == expected


def test_a_label_set_of_digit_names_reads_data_labels_as_names_first() -> None:
    """Star ratings, task.labels=[1,2,3,4,5]: the data's '1' is the label named '1' (class 0) and
    5 is the label named '5' (class 4), not an index past the label set."""
    assert [label_index(value, ["1", "2", "3", "4", "5"]) for value in ("1", 1, "5", 5)] == [0, 0, 4, 4]


@pytest.mark.parametrize(("value", "labels"), [(0, ["1", "2", "3", "4", "5"]), ("1", ["0", "2"]), (1, ["O", "7"])])
def test_a_number_that_is_not_a_name_of_an_integer_named_label_set_is_no_index(value: object, labels: list) -> None:
    """Indices would be ambiguous there: a 0 star rating is not the class named '1', and a
    validation label 1 is not the class '2' of a training split that had the classes 0 and 2."""
    assert label_index(value, labels) is None


# ------------------------------------------------------------------------ question answering
def test_span_exact_match_and_f1_on_known_spans() -> None:
    from peftc.tasks.qa_spans import span_scores

    starts, ends = torch.tensor([3, 3, 10, 5]), torch.tensor([5, 4, 12, 5])
    gold_starts, gold_ends = torch.tensor([3, 4, 3, 5]), torch.tensor([5, 6, 5, 5])
    exact, f1 = span_scores(starts, ends, gold_starts, gold_ends)
    assert exact.tolist() == [1.0, 0.0, 0.0, 1.0]
    # [3,4] vs [4,6]: overlap 1, P = 1/2, R = 1/3 -> F1 = 0.4; disjoint spans score 0
    assert f1.tolist() == pytest.approx([1.0, 0.4, 0.0, 1.0])


def test_best_span_stays_in_the_context_and_within_the_length_limit() -> None:
    from peftc.tasks.qa_spans import best_spans

    start = torch.tensor([[9.0, 0.0, 1.0, 5.0, 0.0, -1.0]])  # position 0 (not context) scores highest
    end = torch.tensor([[9.0, 0.0, 4.0, 0.0, 0.0, 6.0]])
    context = torch.tensor([[0, 0, 1, 1, 1, 1]])
    starts, ends, _ = best_spans(start, end, context, max_tokens=10)
    assert (starts.item(), ends.item()) == (3, 5)  # 5 + 6 beats 1 + 4 and 5 + 0
    starts, ends, _ = best_spans(start, end, context, max_tokens=2)
    assert (starts.item(), ends.item()) == (4, 5)  # at most 2 tokens: [4,5] scores 0+6, the rest <= 5
    assert best_spans(start, end, torch.tensor([[0, 0, 0, 0, 1, 1]]), 2)[0].item() == 4


def test_qa_metrics_average_over_examples_across_batches() -> None:
    task = tasks.get("question_ans")
    totals = summed(
        {"exact": torch.tensor(1.0), "f1": torch.tensor(1.4), "count": torch.tensor(2)},
        {"exact": torch.tensor(0.0), "f1": torch.tensor(0.5), "count": torch.tensor(2)},
    )
    assert task.metrics(totals) == pytest.approx({"val_exact_match": 0.25, "val_f1": 1.9 / 4})


def test_answer_character_span_maps_to_its_tokens() -> None:
    from peftc.tasks.qa_spans import token_span

    offsets = [(0, 0), (0, 3), (0, 0), (0, 3), (4, 7), (8, 11), (0, 0)]  # <s> q </s> "the red fox" </s>
    in_context = [False, False, False, True, True, True, False]
    assert token_span(offsets, in_context, 4, 11) == (4, 5)
    assert token_span(offsets, in_context, 0, 3) == (3, 3)
    assert token_span(offsets[:5], in_context[:5], 4, 11) == (0, 0)  # the answer was truncated away
    # "Bob." as two tokens: the token right after the answer starts where the answer ends
    adjacent = [(0, 0), (0, 3), (0, 0), (9, 12), (12, 13), (0, 0)]
    assert token_span(adjacent, [False, False, False, True, True, False], 9, 12) == (3, 3)
    assert token_span(adjacent, [False, False, False, True, True, False], 12, 13) == (4, 4)


def qa_run(*overrides: str) -> tuple[object, object]:
    from peftc.config.compose import compose, to_spec
    from peftc.planning.model_source import load_tokenizer

    run = to_spec(compose(["task=question_ans", "model=tiny_bert", *overrides]))
    return run, load_tokenizer(run.model)


def test_the_gold_span_is_the_answers_first_occurrence_in_the_context() -> None:
    run, tokenizer = qa_run()
    [example] = tasks.get("question_ans").encode(
        [{"question": "Who came?", "context": "Ann met Ann.", "answer": "Ann"}], run, tokenizer
    )
    [window] = example["windows"]  # a short context is one window
    start, end, offsets = window["start_positions"], window["end_positions"], window["offsets"]
    assert (offsets[start][0], offsets[end][1]) == (0, 3)
    assert tokenizer.decode(window["input_ids"][start : end + 1]) == "Ann"  # context tokens, not the question's
    assert sum(window["context_mask"]) == len("Ann met Ann.")  # one byte token per character
    assert example["gold_spans"] == [[0, 2]]  # in context positions


def test_a_long_context_is_cut_into_windows_that_each_keep_the_whole_question() -> None:
    run, tokenizer = qa_run("data.max_length=48", "task.doc_stride=5")
    question, context = "Who wrote the letter to the queen?", "word " * 60
    [example] = tasks.get("question_ans").encode([{"question": question, "context": context}], run, tokenizer)
    windows = example["windows"]
    assert len(windows) > 1 and all(len(w["input_ids"]) <= 48 for w in windows)
    assert all(question in tokenizer.decode(w["input_ids"]) for w in windows)
    slices = [[o for o, m in zip(w["offsets"], w["context_mask"]) if m] for w in windows]
    assert all(before[-5:] == after[:5] for before, after in zip(slices, slices[1:]))  # doc_stride tokens shared
    assert (slices[0][0][0], slices[-1][-1][1]) == (0, len(context))  # together, the whole context


def test_the_predicted_answer_is_the_context_text_of_the_best_span() -> None:
    """Prediction maps the best token span back to characters: its first token's start to its
    last token's end."""
    run, tokenizer = qa_run()
    task = tasks.get("question_ans")
    row = {"question": "Who came?", "context": "Then Ann met Bob."}
    [example] = task.encode([row], run, tokenizer)
    [window] = example["windows"]
    first = next(i for i, (m, o) in enumerate(zip(window["context_mask"], window["offsets"])) if m and o[0] == 5)
    last = next(i for i, (m, o) in enumerate(zip(window["context_mask"], window["offsets"])) if m and o[1] == 8)

    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids: torch.Tensor, **_: object) -> object:
            start, end = torch.zeros(input_ids.shape), torch.zeros(input_ids.shape)
            start[:, first], end[:, last] = 5.0, 5.0
            return type("Out", (), {"start_logits": start, "end_logits": end})()

    [prediction] = task.predict(Fixed(), [row], tokenizer, run)
    assert (prediction["answer"], prediction["start"], prediction["end"]) == ("Ann", 5, 8)


# ------------------------------------------------------------------------- token classification
def test_each_word_is_labelled_at_its_first_token() -> None:
    from peftc.tasks.token_cls import first_tokens

    # "the red fox": tokens <s> "th" "e" " " "red" " " "f" "ox" </s>
    offsets = [(0, 0), (0, 2), (2, 3), (3, 4), (4, 7), (7, 8), (8, 9), (9, 11), (0, 0)]
    assert first_tokens(["the", "red", "fox"], offsets) == [1, 4, 6]
    assert first_tokens(["the", "red", "fox"], offsets[:5]) == [1, 4, None]  # 'fox' truncated


def test_token_cls_metrics_count_only_labelled_tokens() -> None:
    task = tasks.get("token_cls")
    logits = torch.tensor([[[0.0, 1.0], [5.0, 0.0], [0.0, 3.0], [0.0, 9.0]]])  # predicts 1, 0, 1, 1

    class Fixed(torch.nn.Module):
        def forward(self, **_: object) -> object:
            return type("Out", (), {"logits": logits})()

    labels = torch.tensor([[IGNORE_INDEX, 0, 0, 1]])
    metrics = task.metrics(summed(task.validation_stats(Fixed(), {"input_ids": torch.zeros(1, 4), "labels": labels})))
    # labelled: (0->0), (0->1), (1->1): 2 of 3; class 0: TP1 FN1 -> 2/3; class 1: TP1 FP1 -> 2/3
    assert metrics == pytest.approx({"val_accuracy": 2 / 3, "val_macro_f1": 2 / 3})


def test_a_token_that_carries_its_words_leading_space_labels_that_word() -> None:
    """Byte-level BPE tokenizers whose offsets keep the leading space (GPT-2, Llama 3 and Qwen:
    trim_offsets=false) give 'Ġred' the span of ' red': it is still the first token of 'red'."""
    from peftc.tasks.token_cls import first_tokens

    assert first_tokens(["the", "red", "fox"], [(0, 3), (3, 7), (7, 11)]) == [0, 1, 2]
    assert first_tokens(["the", "red", "fox"], [(0, 0), (0, 3), (3, 5), (5, 7), (7, 11), (0, 0)]) == [1, 2, 4]


def test_token_cls_padding_carries_no_label() -> None:
    from peftc.config.compose import compose, to_spec
    from peftc.planning.model_source import load_tokenizer

    tokenizer = load_tokenizer(to_spec(compose(["model=tiny_llama"])).model)
    examples = [
        {"input_ids": [1, 5, 6], "labels": [IGNORE_INDEX, 1, 0]},
        {"input_ids": [1, 5], "labels": [IGNORE_INDEX, 1]},
    ]
    batch = tasks.get("token_cls").collate(examples, tokenizer, pad_to=4)
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 1, 0, IGNORE_INDEX],
        [IGNORE_INDEX, 1, IGNORE_INDEX, IGNORE_INDEX],
    ]


def test_each_words_tag_labels_its_first_token_and_every_other_token_is_ignored() -> None:
    from peftc.config.compose import compose, to_spec
    from peftc.planning.model_source import load_tokenizer

    run = to_spec(compose(["task=token_cls", "model=tiny_bert", "task.labels=[O,PER]"]))
    row = {"tokens": ["Ann", "met", "Bob"], "tags": ["PER", "O", "PER"]}
    [example] = tasks.get("token_cls").encode([row], run, load_tokenizer(run.model))
    ignored = IGNORE_INDEX
    # byte tokens: <s> A n n ' ' m e t ' ' B o b </s>
    assert example["labels"] == [
        ignored,
        1,
        ignored,
        ignored,
        ignored,
        0,
        ignored,
        ignored,
        ignored,
        1,
        ignored,
        ignored,
        ignored,
    ]


# --------------------------------------------------------------------------- feature extraction
def test_retrieval_metrics_rank_each_anchor_against_the_batch_positives() -> None:
    from peftc.tasks.feature_extraction import FeatureExtractionSpec

    task = tasks.get("feature_extraction")
    # anchors 0 and 1 are nearest to their own positive; anchor 2 is nearest to positive 0
    vectors = {
        "anchor": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.9, 0.0, 0.1]]),
        "positive": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]),
    }

    class Embeds(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
            # rows are anchor ids 0..2 then positive ids 10..12; one token each
            rows = [vectors["anchor"][i] if i < 10 else vectors["positive"][i - 10] for i in input_ids[:, 0].tolist()]
            return type("Out", (), {"last_hidden_state": torch.stack(rows)[:, None, :]})()

    batch = {
        "anchor_input_ids": torch.tensor([[0], [1], [2]]),
        "anchor_attention_mask": torch.ones(3, 1, dtype=torch.long),
        "positive_input_ids": torch.tensor([[10], [11], [12]]),
        "positive_attention_mask": torch.ones(3, 1, dtype=torch.long),
    }
    metrics = task.metrics(summed(task.validation_stats(Embeds(), batch, FeatureExtractionSpec(scale=1.0))))
    assert metrics["val_recall_at_1"] == pytest.approx(2 / 3)
    assert metrics["val_mrr"] == pytest.approx((1 + 1 + 1 / 2) / 3)


def test_mean_pooling_ignores_padding() -> None:
    from peftc.tasks.feature_extraction import embed

    states = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])

    class States(torch.nn.Module):
        def forward(self, **_: object) -> object:
            return type("Out", (), {"last_hidden_state": states})()

    inputs = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0]])}
    assert embed(States(), inputs, "mean").tolist() == [[1.0, 0.0]]
    assert embed(States(), inputs, "last").tolist() == [[1.0, 0.0]]
    assert embed(States(), {**inputs, "attention_mask": torch.tensor([[1, 1, 1]])}, "last").tolist()[
        0
    ] == pytest.approx([2**-0.5, 2**-0.5])
