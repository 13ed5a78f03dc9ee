"""``vitlab compress``: compress a trained run (or checkpoint) and save it as a new checkpoint that reloads
compressed: its surgery record (``engine/surgery.py``) gains the method, so ``load_trained``, ``vitlab eval``
and ``vitlab export`` rebuild it as saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import compress
from .checkpoint import save_weights
from .inference import load_trained
from .surgery import surgery_of

__all__ = ["compress_checkpoint"]


def compress_checkpoint(source: str | Path, method: str, out: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Load ``source``, apply compression ``method`` with ``kwargs``, save to ``out`` (``.safetensors``).

    Returns the method's record entry (its keywords and report: parameters before/after, sparsity).
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {str(out)!r}: expected a .safetensors path for the compressed checkpoint")
    if out.exists() and out.resolve() == Path(source).resolve():
        raise ValueError(f"--out {str(out)!r} is the source checkpoint; write the compressed model elsewhere")
    model, meta, _ = load_trained(source)
    compress.apply(model, method, **kwargs)
    records = surgery_of(model)
    save_weights(model, out, {**meta, "surgery": records})
    return records[-1]
