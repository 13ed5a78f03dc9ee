"""``vitlab list | info | train | distill | eval | predict | bench | reduce``: parse arguments, call library functions.

The console entry point re-executes itself once with glibc's allocator tuned (DESIGN.md: large
batch temporaries otherwise pay page faults on every forward), unless the user set it already.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path

__all__ = ["TUNED_MALLOC", "main", "reexec_with_tuned_allocator"]

TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


def reexec_with_tuned_allocator(argv: list[str] | None = None) -> None:
    """Re-execute this process as ``argv`` with glibc's allocator tuned, unless already set or opted out.

    Benchmark scripts call it first thing (``argv`` default: ``python -m vitlab ...``, the console script).
    """
    if sys.platform != "linux" or os.environ.get("VITLAB_NO_MALLOC_TUNING") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    if "jemalloc" in os.environ.get("LD_PRELOAD", "") or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    env = {**os.environ, **TUNED_MALLOC}
    argv = argv or [sys.executable, "-m", "vitlab", *sys.argv[1:]]
    os.execve(argv[0], argv, env)


def _add_dataclass_args(parser: argparse.ArgumentParser, cls: type, defaults: object, group: object = None) -> None:
    """One flag per config field, grouped by config dataclass, each with its help line (``field`` metadata)."""
    hints = typing.get_type_hints(cls)
    target = group or parser
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            sub = hints[f.name]
            title = f"{f.name} options"
            doc = (sub.__doc__ or "").strip().splitlines()[0] if sub.__doc__ else None
            _add_dataclass_args(parser, sub, getattr(defaults, f.name), parser.add_argument_group(title, doc))
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = f.metadata.get("help", "")
        shown = f"{text} (default: {default!r})" if text else f"(default {default})"
        kind = hints[f.name]
        if kind is bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=shown)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        target.add_argument(flag, type=base, default=None, help=shown)


def _apply_args(cfg: object, args: argparse.Namespace) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _apply_args(value, args)
        elif getattr(args, f.name, None) is not None:
            setattr(cfg, f.name, getattr(args, f.name))


def cmd_list(args: argparse.Namespace) -> int:
    from .models import get_variant, list_models

    names = list_models(args.pattern, kind=args.kind)
    for name in names:
        spec = get_variant(name)
        src = "timm" if spec.timm_native else "vitlab"
        print(f"{name:40s} [{spec.paper.kind}] #{spec.paper.number:<2d} {src:6s} {spec.paper.title}")
    if args.kind in (None, "H", "C"):  # task models: a backbone by name + neck + head (vitlab.tasks)
        from .tasks import get_task, list_tasks

        tasks = [t for t in list_tasks(args.pattern) if get_task(t).kind == (args.kind or get_task(t).kind)]
        for name in tasks:
            spec = get_task(name)
            where = f"#{spec.paper.number:<2d}" if spec.paper is not None else "   "
            print(
                f"{name:40s} [{spec.kind}] {where} task   {spec.description or spec.task} (vitlab train --task {name})"
            )
        names = names + tasks
    if not names:
        print(f"no vitlab model matches {args.pattern!r}", file=sys.stderr)
        return 1
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .bench import count_flops_meta, count_params_meta
    from .models import get_variant, list_models

    spec = get_variant(args.model)
    kwargs = {k: v for k, v in (("img_size", args.img_size), ("in_chans", args.in_chans)) if v is not None}
    in_chans = args.in_chans or spec.in_chans
    img_size = args.img_size or spec.img_size
    flops = count_flops_meta(args.model, **kwargs)
    info = {
        "model": args.model,
        "implementation": "timm (reached through vitlab)" if spec.timm_native else "vitlab",
        "params": f"{count_params_meta(args.model, **kwargs) / 1e6:.3f} M",
        "GFLOPs": f"{flops / 1e9:.3f} (torch.utils.flop_counter; {flops / 2e9:.3f} GMACs, what papers call FLOPs)",
        "input": f"{in_chans}x{img_size}x{img_size}",
        "paper": f"{spec.paper.title} (arXiv:{spec.paper.arxiv}), PAPERS.md #{spec.paper.number}",
        "code": spec.paper.code,
        "reference": spec.ref_source or "-",
        "status": _paper_status(spec.paper.number),
        "variants of this paper": ", ".join(n for n in list_models() if get_variant(n).paper == spec.paper),
    }
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:{width}s}  {v}")
    return 0


def _paper_status(number: int) -> str:
    """One line of ``paper_status.toml`` (package data, so a wheel install has it too) for PAPERS.md row ``number``."""
    from importlib.resources import files

    resource = files("vitlab") / "paper_status.toml"
    if not resource.is_file():
        return "see docs/models.md"
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    rows = {r["number"]: r for r in tomllib.loads(resource.read_text(encoding="utf-8")).get("paper", [])}
    row = rows.get(number, {})
    return f"{row.get('status', '?')}: {row.get('verified') or row.get('notes', '')}".strip()


def cmd_train(args: argparse.Namespace) -> int:
    from .engine import RunConfig, load_config, train
    from .engine.distributed import is_main_process

    if args.resume:
        run = train(resume=args.resume)
    else:
        cfg = load_config(args.config) if args.config else RunConfig()
        _apply_args(cfg, args)
        run = train(cfg)
    if not is_main_process():
        return 0  # under torchrun, rank 0 reports
    summary = run / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        if "test_top1" in s and "test_top5" in s:  # a classifier (task models report their own keys)
            scores = f"test top-1 {s['test_top1']:.2f}%  top-5 {s['test_top5']:.2f}%"
        else:
            scores = f"test {s['primary_metric']} {s['test_' + s['primary_metric']]:.2f}"
        print(f"{scores}  training {s['train_seconds']:.0f}s  ({s['steps']} steps)")
    print(f"run directory: {run}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .engine import RunConfig, load_config
    from .engine.fast_distill import save_logits

    if not args.out:
        raise ValueError("--out is required: the directory that will hold the stored teacher logits")
    cfg = load_config(args.config) if args.config else RunConfig()
    _apply_args(cfg, args)
    out = save_logits(cfg, args.out, topk=args.topk)
    print(f"teacher logits: {out}\ntrain from them: vitlab train --distill-from {out} <the same data and input flags>")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .engine import evaluate_run

    res = evaluate_run(
        args.checkpoint,
        dataset=args.dataset,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        device=args.device,
        out=args.out,
        channels=args.channels,
    )
    if isinstance(res, dict):  # a task model's own metrics
        for key, value in res.items():
            shown = ", ".join("-" if v is None else f"{v:.2f}" for v in value) if isinstance(value, list) else value
            print(f"{key:16s} {shown}")
        return 0
    print(f"top-1 {res.top1:.2f}%  top-5 {res.top5:.2f}%  loss {res.loss:.4f}  ({res.num_images} images)")
    for name, acc in res.per_class.items():
        print(f"  {name:20s} {acc:6.2f}%")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .engine import predict
    from .engine.inference import _resolve_checkpoint, read_metadata

    if read_metadata(_resolve_checkpoint(args.checkpoint)[0]).get("task"):  # a task model: overlay pictures
        from .engine.task_inference import predict_dense

        for path in predict_dense(args.images, args.checkpoint, args.out, device=args.device):
            print(f"wrote {path}")
        return 0
    if not args.images:
        raise ValueError("vitlab predict: images: give at least one image file for a classification run")
    for p in predict(args.images, args.checkpoint, topk=args.topk, device=args.device):
        print(p.path + ": " + ", ".join(f"{name} {prob:.3f}" for name, prob in p.top))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    out = args.out or str(Path("runs") / "bench" / "bench")
    run_bench(
        args.models,
        img_size=args.img_size,
        batch_size=args.batch_size,
        device=args.device,
        amp=args.amp,
        compile=args.compile,
        channels_last=args.channels_last,
        baseline=args.baseline,
        out=out,
        build=_task_builder(args) if args.task else None,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .engine.export import export_target, format_result

    res = export_target(args.target, args.format, args.out, device=args.device, tolerance=args.tolerance)
    print(format_result(res))
    return 0 if res.ok else 1


def cmd_compress(args: argparse.Namespace) -> int:
    from .engine.compress_run import compress_checkpoint
    from .engine.setup import json_keywords

    kwargs = json_keywords("--args", args.args)
    if args.amount is not None:
        kwargs["amount"] = args.amount
    entry = compress_checkpoint(args.source, args.method, args.out, **kwargs)
    report = ", ".join(f"{k} {v}" for k, v in entry.get("report", {}).items())
    print(f"{args.method}: {report}\nwrote {args.out} (reloads compressed: vitlab eval / export {args.out})")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data.synthetic import make

    out = make(
        args.name,
        args.out,
        n=args.n,
        split=args.split,
        seed=args.seed,
        canvas=args.canvas,
        max_items=args.max_items,
        data_dir=args.data_dir,
        frames=args.frames,
        size=args.size,
        views=args.views,
    )
    written = ("scenes.npz", "clips.npz", "render3d.npz", "stick_humans.npz", "driving.npz", "preview.png",
               "preview.gif", "info.json")  # fmt: skip
    files = ", ".join(name for name in written if (out / name).is_file())
    print(f"wrote {out} ({files})")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from .engine.split_run import split_run

    budgets = None
    if args.budgets_mb:
        try:
            budgets = [float(v) * 2**20 for v in args.budgets_mb.split(",")]
        except ValueError:
            raise ValueError(f"--budgets-mb must be comma-separated MiB, e.g. 2,2,4; got {args.budgets_mb!r}") from None
    recipe = {k: getattr(args, k) for k in ("heads", "mlp", "importance", "criterion", "distill_epochs", "distill_on")}
    recipe |= {k: getattr(args, k) for k in ("lr", "tau", "batch_size", "fusion_epochs", "fusion_hidden")}
    data = {"train_subset": args.train_subset, "test_subset": args.test_subset, "seed": args.seed}
    data |= {"dataset": args.dataset, "data_dir": args.data_dir}
    m = split_run(args.source, args.parts, args.out, budgets=budgets, **data, **recipe)
    s = m["scores"]
    print(f"host top-1 {s['host_top1']:.2f}%  split top-1 {s['top1']:.2f}% (arg-max over parts {s['top1_argmax']:.2f})")
    for part in m["parts"]:
        share = 100 * part["params"] / m["host_params"]
        print(f"  {part['file']}: classes {part['classes']}  {part['params']:,} params ({share:.1f}% of the host)")
    print(f"split directory: {args.out} (serve it: vitlab serve-split {args.out} --images ...)")
    return 0


def cmd_serve_split(args: argparse.Namespace) -> int:
    from .engine.split_serve import serve_dataset, serve_images

    server = {"backend": args.backend, "timeout_s": args.timeout}
    if bool(args.images) == bool(args.dataset):
        raise ValueError("give either --images FILE ... or --dataset NAME (with --test-subset K)")
    if args.images:
        for path, top in serve_images(args.split, args.images, topk=args.topk, **server):
            print(path + ": " + ", ".join(f"{name} {prob:.3f}" for name, prob in top))
        return 0
    r = serve_dataset(args.split, args.dataset, args.test_subset, args.batch_size, args.data_dir, **server)
    print(f"top-1 {r['top1']:.2f}% on {r['images']} images; {r['processes']} processes ({r['backend']})")
    print(f"per batch of {r['batch_size']}: part forward ms {r['part_ms']}, end to end {r['end_to_end_ms']:.1f} ms")
    return 0


def _add_split_parsers(sub: argparse._SubParsersAction) -> None:
    """``vitlab split`` and ``vitlab serve-split`` (ED-ViT, arXiv:2410.11650)."""
    p = sub.add_parser("split", help="ED-ViT: split a trained run into class-wise sub-models + a fusion head")
    p.add_argument("source", help="a run directory or .safetensors checkpoint of vitlab train (a classifier)")
    p.add_argument("--parts", type=int, required=True, help="number of sub-models (1..number of classes)")
    p.add_argument("--out", required=True, help="the split directory to write (parts, fusion head, manifest.json)")
    p.add_argument("--heads", type=float, default=0.5, help="fraction of attention heads removed per block (0.5)")
    p.add_argument("--mlp", type=float, default=0.5, help="fraction of MLP channels removed per block (0.5)")
    p.add_argument("--importance", choices=["own", "all"], default="own", help="own classes (ED-ViT) or all (uniform)")
    p.add_argument("--criterion", choices=["taylor", "l1"], default="taylor", help="importance criterion (taylor)")
    p.add_argument("--distill-epochs", type=float, default=1.0, help="distillation passes over each part's data (1)")
    p.add_argument("--distill-on", choices=["own", "all"], default="own", help="distil on own classes' images or all")
    p.add_argument("--lr", type=float, default=5e-4, help="distillation learning rate (5e-4)")
    p.add_argument("--tau", type=float, default=1.0, help="distillation temperature (1)")
    p.add_argument("--batch-size", type=int, default=64, help="distillation batch size (64)")
    p.add_argument("--fusion-epochs", type=int, default=10, help="epochs of the fusion head on frozen parts (10)")
    p.add_argument("--fusion-hidden", type=int, default=64, help="hidden width of the fusion MLP (64)")
    p.add_argument("--budgets-mb", help="memory budget of each device in MiB, e.g. 2,2,4: greedy placement")
    p.add_argument("--train-subset", type=int, default=0, help="training images used (0: all)")
    p.add_argument("--test-subset", type=int, default=0, help="test images scored (0: all)")
    p.add_argument("--dataset", help="override the run's data set")
    p.add_argument("--data-dir", help="where the data set lives")
    p.add_argument("--seed", type=int, default=0, help="seed of subsets and distillation (0)")
    p.set_defaults(fn=cmd_split)
    p = sub.add_parser("serve-split", help="ED-ViT: run a split directory with one process per sub-model")
    p.add_argument("split", help="a split directory written by vitlab split")
    p.add_argument("--images", nargs="+", help="image files to classify")
    p.add_argument("--dataset", help="score a data set's test split instead, e.g. fashion_mnist")
    p.add_argument("--test-subset", type=int, default=0, help="test images scored (0: all)")
    p.add_argument("--data-dir", help="where the data set lives")
    p.add_argument("--batch-size", type=int, default=64, help="images per request (64)")
    p.add_argument("--topk", type=int, default=3, help="classes shown per image (3)")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto", help="torch.distributed backend")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may wait on a process (60)")
    p.set_defaults(fn=cmd_serve_split)


def _task_builder(args: argparse.Namespace) -> object:
    from .tasks import create_task_model

    size = {"img_size": args.img_size} if args.img_size else {}
    return lambda backbone: create_task_model(args.task, backbone=backbone, **size).eval()


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .engine import RunConfig, load_trained
    from .reduce.cli import add_reduce_parser

    parser = argparse.ArgumentParser(prog="vitlab", description="Vision Transformers from the literature, runnable.")
    parser.add_argument("--version", action="version", version=f"vitlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list vitlab models")
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'deit*'")
    p.add_argument("--kind", choices=["B", "T", "H", "C"], help="paper kind (PAPERS.md)")
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("info", help="parameters, GFLOPs, default input and paper of a model")
    p.add_argument("model", help="a vitlab or timm model name")
    p.add_argument("--img-size", type=int, help="input size to count at (default: the model's)")
    p.add_argument("--in-chans", type=int, help="input channels to count at (default: the model's)")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("train", help="train a model (default: the Fashion-MNIST quickstart)")
    p.add_argument("--config", help="YAML/JSON run config; flags override it")
    p.add_argument("--resume", help="continue the run in this run directory exactly where it stopped")
    _add_dataclass_args(p, RunConfig, RunConfig())
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run directory or checkpoint")
    p.add_argument("checkpoint", help="run directory or .safetensors checkpoint")
    p.add_argument("--dataset", help="override the run's data set")
    p.add_argument("--data-dir", help="where the data set lives (default: the run's)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward (default 256)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")
    p.add_argument("--out", help="output directory (default: <run>/eval)")
    p.add_argument("--channels", help="evaluate on these input channels only, e.g. 0,2 (ChannelViT; others: zeroed)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("predict", help="top-k classes for image files (task models: overlays; generators: samples)")
    p.add_argument("images", nargs="*", help="image files (none for a generative run: it writes a sample grid)")
    p.add_argument("--checkpoint", required=True, help="run directory or .safetensors checkpoint")
    p.add_argument("--topk", type=int, default=3, help="classes shown per image (default 3)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", help="task models: directory for the overlay PNGs (default <run>/predict)")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("bench", help="params, GFLOPs, img/s, latency (and a timm baseline)")
    p.add_argument("models", nargs="+", help="model names or shell patterns (backbones with --task)")
    p.add_argument("--img-size", type=int, help="input size (default: each model's)")
    p.add_argument("--batch-size", type=int, default=32, help="images per timed forward (default 32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--amp", action="store_true", help="autocast (bfloat16 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (eager if it fails)")
    p.add_argument("--channels-last", action="store_true", help="channels-last weights and input")
    p.add_argument("--baseline", choices=["timm"], help="also time timm's implementation in the same run")
    p.add_argument("--out", help="path prefix for the CSV and markdown tables (default runs/bench/bench)")
    p.add_argument("--task", help="measure this task model (vitlab list --kind H) on each named backbone")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("export", help="export a model or a trained run (surgery included) and check the export")
    p.add_argument("target", help="a model name (random weights) or a run directory / checkpoint")
    p.add_argument("--format", choices=["onnx", "torch.export"], default="onnx", help="exporter (default onnx)")
    p.add_argument(
        "--out", required=True, help="output file (.onnx / .pt2), or a directory that gets <model>.onnx / .pt2"
    )
    p.add_argument("--device", default="cpu", help="device the model and the check run on (default cpu)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest |exported - PyTorch| accepted")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("compress", help="compress a trained run into a new checkpoint that reloads compressed")
    p.add_argument("source", help="a run directory or .safetensors checkpoint of vitlab train")
    p.add_argument("--method", required=True, help="compression method (vitlab.compress.list_methods())")
    p.add_argument("--args", default="", help="""the method's keywords as JSON, e.g. '{"heads": 0.25}'""")
    p.add_argument("--amount", type=float, help="magnitude: fraction of weights set to zero (default 0.5)")
    p.add_argument("--out", required=True, help="the compressed checkpoint to write (.safetensors)")
    p.set_defaults(fn=cmd_compress)

    p = sub.add_parser("data", help="generated data sets (deterministic, cached, previewed)")
    p = p.add_subparsers(dest="data_command", required=True).add_parser(
        "make", help="generate a synthetic data set into --out with a preview PNG"
    )
    p.add_argument(
        "name",
        help="generator: fmnist_scenes, fmnist_scenes_3d, camera_motion_videos, camera_paths, render3d, stick_humans "
        "or driving",
    )
    p.add_argument("--out", required=True, help="directory to write scenes.npz (clips.npz), previews and info.json")
    p.add_argument("--n", type=int, default=1000, help="number of scenes or clips (default 1000)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="items from this split")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes (default 0)")
    p.add_argument(
        "--canvas",
        type=int,
        help="scene side in pixels, 32-256 (default: the generator's, 64 or 96); for camera_motion_videos the "
        "world canvas side (default 3 x --size)",
    )
    p.add_argument(
        "--max-items",
        type=int,
        help="most items per scene (default: the generator's, 6 or 4); camera_motion_videos: besides the centre item",
    )
    p.add_argument("--frames", type=int, help="camera_motion_videos: frames per clip, 2-64 (default 8)")
    p.add_argument("--size", type=int, help="camera_motion_videos: frame side in pixels, 16-128 (default 32)")
    p.add_argument(
        "--views", type=int, help="render3d, stick_humans, driving: views per sample (default 2, 1, 3; --size 64, 32)"
    )
    p.add_argument("--data-dir", help="where Fashion-MNIST lies (default: its standard places)")
    p.set_defaults(fn=cmd_data)
    p = sub.add_parser("distill", help="TinyViT fast distillation: store a teacher's top-k once per epoch")
    p = p.add_subparsers(dest="distill_command", required=True).add_parser(
        "save-logits",
        help="run --teacher over --epochs epochs of the training data; store seeds and top-k in --out",
        description="Takes the student's training flags (data, --seed, --augment, --mixup, --model/--img-size); "
        "then `vitlab train --distill-from OUT` with the same flags trains without running the teacher.",
    )
    p.add_argument("--config", help="YAML/JSON run config of the student; flags override it")
    p.add_argument("--topk", type=int, help="teacher probabilities kept per image (default min(10, classes))")
    _add_dataclass_args(p, RunConfig, RunConfig())
    p.set_defaults(fn=cmd_distill)
    add_reduce_parser(sub, load_trained=load_trained)
    from .engine.search_run import add_search_parser  # ViT-ResNAS search (issue 15)

    add_search_parser(sub)
    _add_split_parsers(sub)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Run one command; user errors become one line on stderr and exit code 2."""
    from .data import DataError
    from .errors import VitlabError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (VitlabError, DataError, ValueError, FileNotFoundError) as e:
        print(f"vitlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main() -> None:
    reexec_with_tuned_allocator()
    sys.exit(run())


if __name__ == "__main__":
    main()
