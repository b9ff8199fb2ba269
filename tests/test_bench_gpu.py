"""experiments/bench_gpu.py cannot rot: its CPU smoke run (--tiny) makes every row, with finite
ratios and losses that agree with peft's, and its markdown table and JSON say the same; the
compiled rows compile without graph breaks and say what compiling cost. Timings are not checked
(a 2-layer model on a shared CPU measures nothing)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict, str]:
    import bench_gpu

    out = tmp_path_factory.mktemp("bench") / "rows.json"
    profile = out.with_name("profile.txt")
    printed = io.StringIO()
    caches = set(Path(tempfile.gettempdir()).glob("bench_gpu_cache_*"))
    # unset, as in a fresh process (inductor names its default cache there once it has compiled)
    variables = {k: os.environ.pop(k, None) for k in bench_gpu.COMPILE_CACHES}
    with contextlib.redirect_stdout(printed):  # the table; progress goes to stderr
        # eager: Dynamo traces (and would break) the blocks as for inductor, then runs the graphs as
        # they are; AOT autograd's trace and inductor's code are checked in tests/test_fast_paths.py
        argv = ["--tiny", "--warmup", "1", "--steps", "1", "--compile-backend", "eager", "--json", str(out)]
        rows = bench_gpu.main([*argv, "--profile", str(profile)])
    left = {
        "caches": sorted(map(str, set(Path(tempfile.gettempdir()).glob("bench_gpu_cache_*")) - caches)),
        "environment": {k: os.environ[k] for k in variables if k in os.environ},
    }
    os.environ.update({k: v for k, v in variables.items() if v is not None})
    saved = json.loads(out.read_text())
    saved["profile"] = profile.read_text()
    saved["left"] = left
    return rows, saved, printed.getvalue()


def test_a_run_leaves_no_compile_cache_and_no_variable_behind(tiny_run: tuple[list[dict], dict, str]) -> None:
    # It compiles into fresh inductor/Triton caches (compile times as a first run pays them);
    # leaving them would fill /tmp run after run and point later compiles in the process at them.
    assert tiny_run[1]["left"] == {"caches": [], "environment": {}}


def test_tiny_run_has_a_row_per_method_and_per_cpu_precision(tiny_run: tuple[list[dict], dict, str]) -> None:
    import bench_gpu

    rows, saved, _ = tiny_run
    methods = {r["configuration"] for r in rows if r["precision"] == "32-true"}
    assert methods >= {*bench_gpu.METHODS, *bench_gpu.MORE_METHODS}
    assert any("API call" in r["configuration"] for r in rows)
    precisions = {r["precision"] for r in rows if r["configuration"] == "lora all-linear"}
    assert precisions == {"32-true", "bf16-true", "bf16-mixed", "bf16-mixed, bf16 base"}
    trainer_gpu = "bf16-mixed, bf16 base"
    assert ("qlora nf4 all-linear", trainer_gpu) in {(r["configuration"], r["precision"]) for r in rows}
    compiled = {(r["configuration"], r["precision"]) for r in rows if "compiled blocks" in r["configuration"]}
    assert compiled == {
        ("lora all-linear, compiled blocks", "32-true"),
        ("lora all-linear, compiled blocks", trainer_gpu),
        ("qlora nf4 all-linear, compiled blocks", trainer_gpu),
    }
    assert saved["skipped"] == ["lora all-linear, 16-mixed: needs CUDA"]
    assert [(r["configuration"], r["precision"]) for r in saved["rows"]] == [
        (r["configuration"], r["precision"]) for r in rows
    ]


def test_tiny_run_ratios_are_finite_and_losses_agree_with_peft(tiny_run: tuple[list[dict], dict, str]) -> None:
    rows, saved, _ = tiny_run
    for row in rows:
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("peftc_ms", "peft_ms", "ratio", "floor_over_peftc"))
        assert row["peftc_ops"] > 100 and row["peft_ops"] > 100, "a step dispatches hundreds of operators"
        bound = 1e-5 if row["precision"] == "32-true" else 5e-2  # both sides train the same numbers
        assert row["max_loss_rel_diff"] <= bound, row
    assert set(saved["setup"]["floors_ms"]) == {r["precision"] for r in rows}


def test_tiny_run_prints_one_table_line_per_row_and_floor(tiny_run: tuple[list[dict], dict, str]) -> None:
    rows, saved, printed = tiny_run
    table = [line for line in printed.splitlines() if line.startswith("| ") and "configuration" not in line]
    assert len(table) == len(rows) + len(saved["setup"]["floors_ms"])


def test_compiled_rows_compile_without_graph_breaks_and_say_when_compiling_pays(
    tiny_run: tuple[list[dict], dict, str],
) -> None:
    rows, _, printed = tiny_run
    compiled = [r for r in rows if "compiled blocks" in r["configuration"]]
    for row in compiled:
        assert row["peftc_graph_breaks"] == 0, row  # a break per block would hide what compiling buys
        assert row["peftc_compile_s"] > 0 and math.isfinite(row["peft_compile_s"])
        eager = next(
            r
            for r in rows
            if (r["configuration"], r["precision"])
            == (row["configuration"].removesuffix(", compiled blocks"), row["precision"])
        )
        assert row["eager_peftc_ms"] == eager["peftc_ms"]
        saved = eager["peftc_ms"] - row["peftc_ms"]
        expected = row["peftc_compile_s"] * 1e3 / saved if saved > 0 else math.inf
        assert row["break_even_steps"] == pytest.approx(expected)
    assert sum("so it is repaid after" in line for line in printed.splitlines()) == len(compiled)


@pytest.mark.parametrize("part", ["eager", "compiled"])
def test_a_part_runs_its_rows_and_the_compiled_part_brings_their_eager_twins(part: str) -> None:
    import bench_gpu

    rows = bench_gpu.selected_rows(bench_gpu.parse(["--tiny", "--part", part]), bench_gpu.BF16_TRUE)
    compiled = [r for r in rows if r.compiled]
    if part == "eager":
        assert not compiled and len(rows) == len(bench_gpu.rows_to_run(bench_gpu.BF16_TRUE)) - 3
    else:
        assert len(compiled) == 3
        assert [(r.label, r.precision) for r in rows if not r.compiled] == [
            (r.eager().label, r.precision) for r in compiled
        ]


def test_the_profile_has_each_sides_step_per_row_with_the_fused_node_on_peftcs(
    tiny_run: tuple[list[dict], dict, str],
) -> None:
    rows, saved, _ = tiny_run
    headers = [line for line in saved["profile"].splitlines() if line.startswith("## ")]
    for row in rows:
        title = f"## {row['configuration']}, {row['precision']}: "
        sides = {h.removeprefix(title) for h in headers if h.startswith(title)}
        assert {"peft"} < sides, (title, sides)  # peftc (or its API side), peft, and maybe the floor
    lora = saved["profile"].split("## lora all-linear, 32-true: peftc\n")[1].split("## ")[0]
    assert "LowRankLinear" in lora, "a profiled step names the operators that ran"


def test_the_device_scripts_parse_and_fetch_what_constraints_txt_pins() -> None:
    """experiments/device/ cannot rot either: both scripts parse, and every wheel fetch_wheels.sh
    takes is pinned in constraints.txt (it reads the version there; a missing pin would fetch
    nothing and the device run would fail on import, after its machine had started)."""
    root = Path(__file__).resolve().parents[1]
    for script in ("fetch_wheels.sh", "bench.sh"):
        subprocess.run(["bash", "-n", str(root / "experiments" / "device" / script)], check=True)
    constraints = (root / "constraints.txt").read_text().splitlines()
    pinned = {line.split("==")[0].lower() for line in constraints if "==" in line}
    wanted = re.findall(r"\$\(pin ([\w.-]+)\)", (root / "experiments" / "device" / "fetch_wheels.sh").read_text())
    assert len(wanted) >= 10 and {name.lower() for name in wanted} <= pinned, set(wanted) - pinned
