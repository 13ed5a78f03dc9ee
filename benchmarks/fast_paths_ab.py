"""Before/after speed of the fast-path move: the models and mixer whose fast paths moved, old code vs new.

Moving the fused oneDNN forwards and the compiled scan behind one dispatch (``layers/fast/``) must cost no speed.
This script checks out the code before the move (``--old``, a commit) into a temporary git worktree and times the
same models with both versions in alternation, each timing in a fresh process that imports one version only
(``PYTHONPATH``), so drift hits both alike. Models: every family with a fast path at its zoo variant
(``benchmarks/zoo.py``: CPU inference, batch 32, 224 px), and MSVMamba's mixer at the token counts of
``benchmarks/scaling.py``. Writes ``benchmarks/results/fast_paths_ab.{csv,md}``; ratio = old time / new time
(>= 1: the new code is no slower).

    .venv/bin/python benchmarks/fast_paths_ab.py --old 72f8763
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ["s2aformer_tiny", "ppma_tiny", "msvmamba_nano", "svt_h_s", "spectformer_t"]
MIXER_TOKENS = [1024, 4096]


def worker(args: argparse.Namespace) -> None:
    """Time one model (or the scan mixer) with whatever ``vitlab`` is importable; print JSON."""
    import torch

    import vitlab
    from vitlab.bench.speed import time_interleaved

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.mixer_tokens:
        from vitlab.layers import get_mixer

        side = int(args.mixer_tokens**0.5)
        net = get_mixer("selective_scan_2d")(192).eval()
        x, extra = torch.randn(4, side * side, 192), ((side, side),)
    else:
        net = vitlab.create_model(args.model, num_classes=1000).eval()
        x, extra = torch.randn(args.batch, 3, 224, 224), ()

    def step() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            net(x, *extra)
        return time.perf_counter() - t

    (times,) = time_interleaved([step], warmup=2, repeats=args.repeats)
    print(json.dumps({"seconds": statistics.median(times), "vitlab": vitlab.__file__}))


def time_in(src: Path, what: list[str], args: argparse.Namespace) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, __file__, "--worker", "--threads", str(args.threads), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd + what, env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if not result["vitlab"].startswith(str(src)):  # the right version was imported, not the installed one
        raise RuntimeError(f"expected vitlab from {src}, imported {result['vitlab']}")
    return result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="72f8763", help="the commit before the move")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--mixer-tokens-list", type=int, nargs="*", default=MIXER_TOKENS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="old/new alternations per item")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mixer-tokens", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    items = [(m, ["--model", m, "--batch", str(args.batch)]) for m in args.models]
    items += [(f"selective_scan_2d @ {n} tokens", ["--mixer-tokens", str(n)]) for n in args.mixer_tokens_list]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.old], check=True)
        try:
            for name, what in items:
                times: dict[str, list[float]] = {"old": [], "new": []}
                for _ in range(args.rounds):
                    times["old"].append(time_in(old / "src", what, args))
                    times["new"].append(time_in(ROOT / "src", what, args))
                o, n = statistics.median(times["old"]), statistics.median(times["new"])
                rows.append({"item": name, "old_ms": round(1e3 * o, 1), "new_ms": round(1e3 * n, 1)})
                rows[-1]["ratio_old_over_new"] = round(o / n, 3)
                print(rows[-1], flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=True)
    write(rows, args)


def write(rows: list[dict], args: argparse.Namespace) -> None:
    import torch

    from vitlab.bench import describe_machine

    machine = describe_machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "fast_paths_ab.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Fast paths behind one dispatch: speed before and after the move",
        "",
        f"Old: commit `{args.old}` (fused forwards inside the model files, ctypes scan); new: this tree "
        "(`layers/fast/`, the scan as the `vitlab::scan_d1` op). CPU inference in float32, no autograd; models at "
        f"batch {args.batch} and 224 px, the mixer at batch 4, width 192. Each time is the median of {args.repeats} "
        f"calls after 2 warm-ups, in a fresh process per version; {args.rounds} old/new alternations, median taken.",
        f"Machine: {machine.get('cpu', '?')}, {args.threads} threads; torch {torch.__version__}. "
        f"Date: {time.strftime('%Y-%m-%d')}. Produced by `python benchmarks/fast_paths_ab.py --old {args.old}`.",
        "",
        "| model / mixer | old (ms) | new (ms) | old / new |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| `{r['item']}` | {r['old_ms']} | {r['new_ms']} | {r['ratio_old_over_new']:.3f} |" for r in rows]
    (RESULTS / "fast_paths_ab.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
