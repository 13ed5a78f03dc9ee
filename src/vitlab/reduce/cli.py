"""``vitlab reduce MODEL --method tome --r 8``: apply a token-reduction method and report what it does.

Prints the per-block schedule, tokens after each block, GFLOPs and img/s before and after (FLOPs from
``torch.utils.flop_counter`` on the reduced graph, timing from ``torch.utils.benchmark``), and with
``--visualize IMAGE --out PNG`` draws the source map over the image.
``reduce/`` may not import ``engine/`` (DESIGN.md import arrows), so loading a trained checkpoint is
delegated: ``add_reduce_parser(subparsers, load_trained=vitlab.engine.load_trained)``.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ..models import create_model
from . import apply, forward_with_state, list_methods, schedule_of

__all__ = ["add_reduce_parser", "cmd_reduce", "method_kwargs"]

LoadTrained = Callable[..., tuple[nn.Module, dict[str, Any], Any]]


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def add_reduce_parser(subparsers: Any, load_trained: LoadTrained | None = None) -> argparse.ArgumentParser:
    """Register the ``reduce`` verb; ``load_trained`` (``vitlab.engine.load_trained``) enables ``--checkpoint``."""
    p = subparsers.add_parser("reduce", help="apply token reduction (ToMe, EViT, ATS, MCTF): tokens, GFLOPs, img/s")
    p.add_argument("model", nargs="?", help="model name (vitlab or timm); optional with --checkpoint")
    p.add_argument("--method", required=True, choices=list_methods(), help="the token reduction method")
    p.add_argument("--r", help="ToMe/MCTF tokens merged per block: an int or a comma list per block")
    p.add_argument("--keep", type=float, help="EViT keep rate / ATS budget fraction")
    p.add_argument("--layers", type=_int_list, help="0-based blocks that reduce, e.g. 3,6,9")
    p.add_argument("--pad-to-budget", action="store_true", help="ATS: static token counts (for export)")
    p.add_argument("--checkpoint", help="run directory or .safetensors checkpoint of a vitlab run")
    p.add_argument("--img-size", type=int, help="input size (default: the model's or the run's)")
    p.add_argument("--in-chans", type=int, help="input channels (default: the model's or the run's)")
    p.add_argument("--batch-size", type=int, default=32, help="images per timed forward (default 32)")
    p.add_argument("--no-speed", action="store_true", help="skip the img/s measurement")
    p.add_argument("--visualize", metavar="IMAGE", help="draw the source map of IMAGE")
    p.add_argument("--out", default="reduce_sources.png", help="PNG path for --visualize")
    p.set_defaults(fn=partial(cmd_reduce, load_trained=load_trained))
    return p


def method_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keywords for ``vitlab.reduce.apply`` from parsed flags (only those given)."""
    kw: dict[str, Any] = {}
    if args.r is not None:
        r = _int_list(args.r)
        kw["r"] = r[0] if len(r) == 1 and "," not in args.r else r
    if args.keep is not None:
        kw["keep"] = args.keep
    if args.layers is not None:
        kw["layers"] = args.layers
    if args.pad_to_budget:
        kw["pad_to_budget"] = True
    return kw


def _build(args: argparse.Namespace, load_trained: LoadTrained | None) -> nn.Module:
    if args.checkpoint:
        if load_trained is None:
            raise ValueError(
                "--checkpoint needs vitlab's engine: register the verb with add_reduce_parser(..., load_trained)"
            )
        return load_trained(args.checkpoint)[0]
    if not args.model:
        raise ValueError("give a MODEL name or --checkpoint")
    kw = {k: v for k, v in (("img_size", args.img_size), ("in_chans", args.in_chans)) if v is not None}
    return create_model(args.model, **kw)


def _gflops(model: nn.Module, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / len(x) / 1e9


def _img_per_s(model: nn.Module, x: torch.Tensor) -> float:
    # imported here: torch.utils.benchmark pulls in cpp_extension, which warns about CUDA_HOME at import
    from torch.utils.benchmark import Timer

    with torch.no_grad():
        model(x)  # warm-up
        m = Timer("model(x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads()).blocked_autorange(
            min_run_time=2.0
        )
    return len(x) / m.median


def cmd_reduce(args: argparse.Namespace, load_trained: LoadTrained | None = None) -> int:
    """Apply ``--method`` to the model and print schedule, tokens per block, GFLOPs and img/s."""
    model = _build(args, load_trained).eval()
    base = copy.deepcopy(model)
    apply(model, args.method, **method_kwargs(args))
    chans = int(model.pretrained_cfg["input_size"][0]) if args.in_chans is None else args.in_chans
    # real-looking input: random noise would make every token look alike to the similarity metrics
    x = torch.rand(args.batch_size, chans, *model.patch_embed.img_size)
    with torch.no_grad():
        counts = []
        hooks = [b.register_forward_hook(lambda m, i, o: counts.append(_width(o))) for b in model.blocks]
        forward_with_state(model, x[:1])
        for h in hooks:
            h.remove()
    print(f"{args.method} on {model.pretrained_cfg.get('architecture', type(model).__name__)}")
    print(f"  schedule per block : {schedule_of(model)}")
    print(f"  tokens after block : {counts}")
    g0, g1 = _gflops(base, x[:1]), _gflops(model, x[:1])
    print(f"  GFLOPs per image   : {g0:.3f} -> {g1:.3f}  ({g0 / g1:.2f}x fewer)")
    if not args.no_speed:
        s0, s1 = _img_per_s(base, x), _img_per_s(model, x)
        print(f"  img/s (batch {args.batch_size:3d})  : {s0:.1f} -> {s1:.1f}  ({s1 / s0:.2f}x)")
    if args.visualize:
        from .visualize import save_source_map

        print(f"  source map         : {save_source_map(model, args.visualize, args.out)}")
    return 0


def _width(out: Any) -> int:
    return (out[0] if isinstance(out, tuple) else out).shape[1]
