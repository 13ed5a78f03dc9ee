"""Multi-scale deformable attention on CPU: vitlab's op vs HF transformers' pure-PyTorch op (``layers/deform_attn.py``).

Times ``vitlab.layers.multi_scale_deformable_attention`` against the ``MultiScaleDeformableAttention`` op of
``transformers.models.deformable_detr`` (the official ``ms_deform_attn_core_pytorch``, what runs without the CUDA
extension) at three sizes, on the same inputs (sampling points spread over [-0.1, 1.1], softmax weights):
forward (no grad) and forward + backward (gradients for value, locations and weights). Both are timed in
alternation (``vitlab.bench.time_interleaved``, warm-up first, median of rounds) with a fixed thread count, after a
check that they agree. Writes ``benchmarks/results/deform_attn.{csv,md}``. About a minute on 2 CPU cores.

    .venv/bin/python benchmarks/deform_attn.py --threads 2                     # the committed table
    .venv/bin/python benchmarks/deform_attn.py --quick --results /tmp          # smoke run
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# name -> (levels, batch, heads, dim); queries = all positions (the encoder's self-attention), 4 points per level
SIZES = {
    "small": ([(16, 16), (8, 8)], 2, 8, 256),
    "medium": ([(32, 32), (16, 16), (8, 8)], 2, 6, 192),  # ViT-CoMer-like
    "large": ([(64, 64), (32, 32), (16, 16), (8, 8)], 1, 8, 256),  # Deformable-DETR-encoder-like
}
POINTS = 4


def _retune_allocator() -> None:
    from vitlab.cli import reexec_with_tuned_allocator

    reexec_with_tuned_allocator([sys.executable, *sys.argv])


def make_inputs(shapes: list[tuple[int, int]], batch: int, heads: int, dim: int, seed: int) -> list[torch.Tensor]:
    """value, sampling locations, attention weights, and an upstream gradient for the backward pass."""
    g = torch.Generator().manual_seed(seed)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(batch, S, heads, dim // heads, generator=g)
    locations = torch.rand(batch, S, heads, L, POINTS, 2, generator=g) * 1.2 - 0.1
    weights = torch.randn(batch, S, heads, L * POINTS, generator=g).softmax(-1).view(batch, S, heads, L, POINTS)
    return [value, locations, weights, torch.randn(batch, S, dim, generator=g)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="3 rounds after 1 warm-up: checks the script runs")
    p.add_argument("--threads", type=int, default=2, help="torch threads, fixed for the whole run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    _retune_allocator()
    if args.quick:
        args.repeats, args.warmup = 3, 1
    torch.set_num_threads(args.threads)

    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention as HFOp

    from vitlab.bench import describe_machine
    from vitlab.bench.speed import time_interleaved
    from vitlab.layers import multi_scale_deformable_attention

    hf_op = HFOp()

    def hf_for(shapes):
        # HF's layer builds the shape tensor and level offsets once per forward; build them outside the timing
        shapes_t = torch.tensor(shapes)
        starts = torch.cat([shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]])
        return lambda value, _, locations, weights: hf_op(value, shapes_t, shapes, starts, locations, weights, 64)

    def step(op, inputs, shapes, backward):
        value, locations, weights, grad = inputs

        def run() -> float:
            leaves = [t.detach().requires_grad_(backward) for t in (value, locations, weights)]
            t0 = time.perf_counter()
            with torch.set_grad_enabled(backward):
                out = op(leaves[0], shapes, leaves[1], leaves[2])
                if backward:
                    out.backward(grad)
            return time.perf_counter() - t0

        return run

    rows, diffs = [], {}
    for size in args.sizes:
        shapes, batch, heads, dim = SIZES[size]
        inputs = make_inputs(shapes, batch, heads, dim, args.seed)
        ops = {"ours": multi_scale_deformable_attention, "hf": hf_for(shapes)}
        with torch.no_grad():
            outs = [op(inputs[0], shapes, inputs[1], inputs[2]) for op in ops.values()]
        diffs[size] = float((outs[0] - outs[1]).abs().max())
        for name, backward in (("forward", False), ("forward+backward", True)):
            steps = [step(op, inputs, shapes, backward) for op in ops.values()]
            seconds = time_interleaved(steps, warmup=args.warmup, repeats=args.repeats)
            ours_ms, hf_ms = (1e3 * sorted(s)[len(s) // 2] for s in seconds)
            rows.append(
                {"size": size, "pass": name, "ours_ms": round(ours_ms, 2), "hf_ms": round(hf_ms, 2)}
                | {"speed_ratio_hf_over_ours": round(hf_ms / ours_ms, 2)}
            )
            print(rows[-1], flush=True)

    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / "deform_attn"
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import transformers

    machine = describe_machine()
    sizes = "; ".join(
        f"{s}: levels {'+'.join(f'{h}x{w}' for h, w in SIZES[s][0])}, B={SIZES[s][1]}, heads {SIZES[s][2]}, "
        f"dim {SIZES[s][3]}"
        for s in args.sizes
    )
    header = [
        "# Multi-scale deformable attention on CPU: vitlab vs HF transformers (pure PyTorch)",
        "",
        f"`{' '.join(['python', *sys.argv])}`; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"transformers {transformers.__version__}; fp32, Q = S (encoder self-attention), {POINTS} points; "
        f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up.",
        f"Sizes: {sizes}.",
        "Max abs difference of the outputs: " + ", ".join(f"{s} {d:.1e}" for s, d in diffs.items()) + ".",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items() if v is not None) + ".",
    ]
    cols = ["size", "pass", "ours ms", "HF ms", "speed ratio HF/ours"]
    lines = [*header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.csv and .md")


if __name__ == "__main__":
    main()
