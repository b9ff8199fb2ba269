"""The plan table never cuts the part of a module name that tells rows apart, at any width."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

import peftc
from peftc.planning.render import print_plan, render_plan

LABELS = ("bert.encoder.layer.{0-1}.attention.self.query", "bert.encoder.layer.{0-1}.attention.self.value")


@pytest.fixture(scope="module")
def bert_plan() -> peftc.planning.plan.Plan:
    return peftc.compile(["model=tiny_bert", "task=seq_cls", "peft.target_modules=[query,value]"])


@pytest.mark.parametrize("width", [60, 80, 140])
def test_module_names_survive_a_narrow_table(bert_plan, width: int) -> None:
    text = render_plan(bert_plan, width=width)
    for label in LABELS:
        assert label in text, f"{label} cut at width {width}:\n{text}"


def test_the_head_kept_in_full_is_named_in_full(bert_plan) -> None:
    assert "classifier" in render_plan(bert_plan, width=60)


def test_printed_to_a_file_the_plan_is_as_wide_as_its_content(bert_plan, monkeypatch) -> None:
    buffer = io.StringIO()
    monkeypatch.setattr("rich.console.Console.__init__", _into(buffer, Console.__init__))
    print_plan(bert_plan)
    text = buffer.getvalue()
    assert all(label in text for label in LABELS)
    assert "…" not in text


def _into(buffer: io.StringIO, original):  # noqa: ANN001, ANN202
    """Console(...) writing into `buffer` as a non-terminal, whatever width the caller asks."""

    def init(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        kwargs.setdefault("file", buffer)
        kwargs.setdefault("force_terminal", False)
        original(self, *args, **kwargs)

    return init
