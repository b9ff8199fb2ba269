"""The sweep plot is honest about scale: a tiny spread stays visibly flat and the title states it."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftc.cli.sweep_plot import MIN_RELATIVE_SPAN, metric_limits, plot_sweep, range_note


def rows(losses: list[float]) -> list[dict]:
    return [
        {"job": i, "overrides": f"peft.r={r}", "val_loss": loss, "trainable_params": 1000 * r, "status": "done"}
        for i, (r, loss) in enumerate(zip((4, 8, 16), losses))
    ]


def test_a_spread_of_noise_does_not_fill_the_metric_axis() -> None:
    low, high = metric_limits([5.482, 5.484, 5.486])
    assert high - low >= MIN_RELATIVE_SPAN * 5.484 * 0.999
    assert (5.486 - 5.482) / (high - low) < 0.02  # the differences use under 2% of the axis


def test_a_real_difference_keeps_its_own_scale() -> None:
    low, high = metric_limits([2.0, 5.0])
    assert low < 2.0 and high > 5.0 and high - low == pytest.approx(3.0 * 1.2)


def test_the_title_states_the_range() -> None:
    assert range_note([5.482, 5.486]) == " (range 5.482–5.486, spread 0.004)"
    assert range_note([5.482]) == ""


def test_the_written_plot_uses_those_limits(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    captured = {}
    original = plt.Figure.savefig

    def keep_axes(fig, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        captured["ylim"] = fig.axes[0].get_ylim()
        captured["title"] = fig.axes[0].get_title()
        return original(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt.Figure, "savefig", keep_axes)
        assert plot_sweep(rows([5.482, 5.484, 5.486]), ["peft.r"], "val_loss", tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
    assert captured["ylim"] == pytest.approx(metric_limits([5.482, 5.484, 5.486]))
    assert "spread 0.004" in captured["title"]
