"""Export a model (or a trained run, its surgery replayed) to ONNX or ``torch.export``, run the exported graph
once, and report how far its output is from the eager model's.

ONNX goes through ``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based exporter, torch >= 2.5,
the default path on this project's torch) and runs in onnxruntime; ``torch.export`` programs are saved with
``torch.export.save`` (``.pt2``) and run from ``torch.export.load(...).module()``. A model that cannot be
exported raises an ``ExportError`` with one line saying why (the exporter's own first line and the op it names).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import ExportError
from ..models import VARIANTS, UnknownModelError, create_model
from .inference import load_trained

__all__ = ["FORMATS", "ExportResult", "export_model", "export_target", "format_result"]

FORMATS = ("onnx", "torch.export")
_SUFFIX = {"onnx": ".onnx", "torch.export": ".pt2"}


@dataclass(frozen=True)
class ExportResult:
    """Where the export went and how closely the exported graph reproduces the eager model."""

    path: Path
    format: str
    max_abs_diff: float
    tolerance: float
    ok: bool


def format_result(result: ExportResult) -> str:
    """One line for the command line, e.g. ``exported to m.onnx (onnx); max |diff| 3.1e-07 vs PyTorch ...: ok``."""
    verdict = "ok" if result.ok else "MISMATCH"
    return (
        f"exported to {result.path} ({result.format}); max |diff| {result.max_abs_diff:.1e} vs PyTorch "
        f"(tolerance {result.tolerance:.0e}): {verdict}"
    )


def _one_line(e: BaseException) -> str:
    """Why an export failed, in one line: the innermost cause's first line, the op and the source line if named."""
    chain = [e]
    while chain[-1].__cause__ is not None and len(chain) < 8:
        chain.append(chain[-1].__cause__)
    texts = [re.sub(r"\x1b\[[0-9;]*m", "", str(c)) for c in reversed(chain)]  # innermost first, no colours
    inner = chain[-1]
    first = next((ln.strip() for ln in texts[0].splitlines() if ln.strip()), "")
    line = f"{type(inner).__name__}: {first[:300]}" if first else type(inner).__name__
    op = next((m.group(0) for t in texts if (m := re.search(r"\baten(?:::|\.)[A-Za-z_]\w*(?:\.\w+)?", t))), None)
    if op and op not in line:
        line += f" (op {op})"
    where = next((m for t in texts if (m := re.search(r'raised this error:\s*File "([^"]+)", line (\d+)', t))), None)
    if where:
        line += f" (at {where.group(1)}:{where.group(2)})"
    return line


def _flatten(out: Any) -> list[torch.Tensor]:
    """The tensors of a tensor / tuple / list / dict output, in the order exporters flatten them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten(v)]
    return []  # None and other constants are not graph outputs


def _run_onnx(path: Path, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), inputs, strict=False)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...], fmt: str, out: Path) -> list[torch.Tensor]:
    """Write the export to ``out`` and return the exported graph's outputs on ``inputs``."""
    if fmt == "onnx":
        torch.onnx.export(model, inputs, str(out), dynamo=True, verbose=False)
        return _run_onnx(out, inputs)
    torch.export.save(torch.export.export(model, inputs), str(out))
    return _flatten(torch.export.load(str(out)).module()(*inputs))


def _check_declared(model: nn.Module) -> None:
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")
    spec = VARIANTS.get(arch)
    if spec is not None and not spec.exportable:
        raise ExportError(f"{arch} cannot be exported: {spec.export_reason or 'its variant declares so'}")


def _is_folder(out: Path) -> bool:
    """An existing directory, or a path without a file suffix (``exports/``): the export goes inside."""
    return out.is_dir() or not out.suffix


def export_model(
    model: nn.Module, example_inputs: tuple[Any, ...], fmt: str, out: str | Path, tolerance: float = 1e-4
) -> ExportResult:
    """Export ``model``'s eval-mode forward on ``example_inputs``, run the export once and compare its outputs.

    Args:
        fmt: ``"onnx"`` or ``"torch.export"``.
        out: the file to write (``.onnx`` / ``.pt2``); a directory (or a path without a suffix) gets
            ``model.onnx`` / ``model.pt2`` inside.
        tolerance: the largest absolute difference from the eager outputs that counts as ``ok``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    _check_declared(model)
    out = Path(out)
    out = out / f"model{_SUFFIX[fmt]}" if _is_folder(out) else out
    out.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = _flatten(model(*example_inputs))
        try:
            got = _export(model, tuple(example_inputs), fmt, out)
        except Exception as e:  # exporters raise many types; the user needs one line, the cause stays chained
            raise ExportError(f"cannot export {type(model).__name__} to {fmt}: {_one_line(e)}") from e
    finally:
        model.train(was_training)
    if len(got) != len(ref):
        raise ExportError(f"the {fmt} export returns {len(got)} outputs, the model {len(ref)}")
    diffs = [(g.to(r.device, torch.float64) - r.double()).abs().max().item() for g, r in zip(got, ref, strict=True)]
    diff = max(diffs, default=0.0)
    return ExportResult(out, fmt, diff, tolerance, not math.isnan(diff) and diff <= tolerance)


def _input_size(model: nn.Module, meta: dict[str, Any] | None) -> tuple[int, int, int]:
    if meta is not None:
        size = meta["img_size"]
        h, w = (size, size) if isinstance(size, int) else size
        return int(meta["in_chans"]), int(h), int(w)
    c, h, w = model.pretrained_cfg["input_size"]
    return int(c), int(h), int(w)


def export_target(
    target: str | Path, fmt: str, out: str | Path, device: str = "cpu", tolerance: float = 1e-4
) -> ExportResult:
    """Export a model name (built as registered, random weights) or a run directory / checkpoint.

    A run is rebuilt by ``load_trained`` with its surgery replayed, so a reduced or compressed run exports as
    it was trained. The example input is one image, ``(1, in_chans, img_size, img_size)``, from the
    checkpoint's metadata or the model's ``pretrained_cfg``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    path = Path(target)
    meta = None
    if path.exists():
        model, meta, _ = load_trained(path, device)
    else:
        try:
            model = create_model(str(target)).to(device)
        except UnknownModelError as e:
            raise ExportError(f"{str(target)!r} is neither a run directory / checkpoint nor a model name: {e}") from e
    c, h, w = _input_size(model, meta)
    x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    if _is_folder(Path(out)):
        out = Path(out) / f"{(meta or {}).get('model') or str(target)}{_SUFFIX[fmt]}"
    return export_model(model, (x,), fmt, out, tolerance)
