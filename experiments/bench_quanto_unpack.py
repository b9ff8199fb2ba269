"""quanto's int4 unpacking on a CPU: optimum-quanto's C++ kernel beside the torch operations peftc
registers in its place (peftc/quant/quanto.py), and what each costs inside a quanto int4 layer's
forward and backward.

    python experiments/bench_quanto_unpack.py [--repeats 20]

The C++ kernel is built first (quanto compiles it into its package directory on first use; the
build time is printed, and is 0 when a build is already there). Each unpack is checked equal.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

# (rows, columns) of a weight: bench_quant.py's mini-Llama MLP projections, a 768-wide encoder's
# projection, a 4096-wide decoder's attention
# projection and its MLP projection.
SHAPES = [(1376, 512), (512, 1376), (768, 768), (4096, 4096), (11008, 4096)]


def seconds_per_call(function, repeats: int) -> float:
    function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def register_cpu_unpack(function) -> torch.library.Library:
    library = torch.library.Library("quanto", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        library.impl("unpack", function, "CPU", allow_override=True)
    return library


def layer_step(rows: int, columns: int):
    from optimum.quanto import qint4
    from optimum.quanto.nn import quantize_module

    layer = quantize_module(torch.nn.Linear(columns, rows, bias=False), weights=qint4)
    layer.freeze()
    layer.weight.requires_grad_(False)
    x = torch.randn(4, 128, columns, requires_grad=True)

    def step() -> None:
        layer(x).sum().backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    from optimum.quanto.library.extensions.cpp import ext

    from peftc.quant.quanto import unpack_codes

    start = time.perf_counter()
    ext.lib  # noqa: B018  (builds or loads the C++ kernel)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; C++ kernel ready in {time.perf_counter() - start:.1f} s"
    )
    print(
        f"{'weight':>12} {'unpack C++ ms':>14} {'unpack torch ms':>16} {'ratio':>6} {'layer C++ ms':>13} {'layer torch ms':>15} {'ratio':>6}"
    )
    for rows, columns in SHAPES:
        packed = torch.randint(0, 256, ((rows + 1) // 2, columns), dtype=torch.uint8)
        assert torch.equal(ext.lib.unpack(packed, 4), unpack_codes(packed, 4))
        cpp = seconds_per_call(lambda packed=packed: ext.lib.unpack(packed, 4), args.repeats)
        ours = seconds_per_call(lambda packed=packed: unpack_codes(packed, 4), args.repeats)
        step = layer_step(rows, columns)
        keep = register_cpu_unpack(ext.lib.unpack)
        layer_cpp = seconds_per_call(step, max(3, args.repeats // 4))
        keep = register_cpu_unpack(unpack_codes)
        layer_ours = seconds_per_call(step, max(3, args.repeats // 4))
        del keep
        print(
            f"{rows:>6}x{columns:<5} {cpp * 1e3:>14.2f} {ours * 1e3:>16.2f} {ours / cpp:>6.2f}"
            f" {layer_cpp * 1e3:>13.1f} {layer_ours * 1e3:>15.1f} {layer_ours / layer_cpp:>6.2f}"
        )


if __name__ == "__main__":
    main()
