"""What the task-model benchmark scripts share (``modular_moe.py``, ``vivit_recipe.py``, ``dvgformer.py``, ...): the
small training loop (:func:`train`: AdamW with linear warmup and cosine decay over ``BatchLoader`` dict batches or any
loader, gradient clipping at 1, the model's own loss and ``forward_kwargs``, so multi-task models see their batch's
tasks) and the table helpers (:func:`cell`, a "mean ± half the range over seeds" markdown cell; :func:`write_csv`,
the per-seed rows, and :func:`read_csv`, which reads them back to merge runs made apart). Not a script; the siblings
import it."""

from __future__ import annotations

import csv
import math
import statistics
import time

import torch

from vitlab.data.loader import BatchLoader


def warmup_cosine(optimizer: torch.optim.Optimizer, total: int, warm: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The benchmarks' schedule: linear warm-up over ``warm`` steps, times a cosine from 1 to 0 over ``total``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )


def train(model, data, epochs: float, lr: float, batch: int, seed: int, steps: int = 0, loader=None,
          after_step=None) -> float:  # fmt: skip
    """Train ``model`` on ``data`` for ``steps`` (else ``epochs`` of batches); returns the wall time (s).

    ``loader`` (anything with ``len`` and ``iter_batches(epoch)``) replaces the shuffled ``BatchLoader`` of ``data``.
    ``after_step(step, loss)`` runs after every step (e.g. a learning curve); its time is not counted, and the model
    is put back in training mode after it.
    """
    loader = loader or BatchLoader(data, batch, shuffle=True, seed=seed)
    total = steps or max(1, round(epochs * len(loader)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    schedule = warmup_cosine(optimizer, total, max(1, total // 10))
    model.train()
    t0, step, epoch, outside = time.perf_counter(), 0, 0, 0.0
    while step < total:
        for b in loader.iter_batches(epoch):
            loss = model.loss(model(b["image"], **model.forward_kwargs(b)), b)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if after_step is not None:
                t1 = time.perf_counter()
                after_step(step, float(loss.detach()))
                model.train()
                outside += time.perf_counter() - t1
            if step >= total:
                break
        epoch += 1
    return time.perf_counter() - t0 - outside


def cell(values: list, digits: int = 1, sign: bool = False) -> str:
    """A table cell: the mean of ``values`` (None and "" skipped) ± half their range, "-" when none is left.

    One value prints without a spread; ``sign`` prints the mean with its sign (for differences).
    """
    values = [float(v) for v in values if v is not None and v != ""]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text if len(values) == 1 else f"{text} ± {(max(values) - min(values)) / 2:.{digits}f}"


def write_csv(path, rows: dict, columns, keys: tuple[str, ...] = ("row",)) -> None:
    """Write ``rows`` (a label, or a tuple of labels named by ``keys``, -> its per-seed dicts) to the CSV ``path``:
    the key columns, ``seed``, then ``columns`` (a missing or None value is an empty cell)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*keys, "seed", *columns])
        for key, runs in rows.items():
            for r in runs:
                w.writerow([*(key if isinstance(key, tuple) else (key,)), r["seed"], *(r.get(k) for k in columns)])


def read_csv(path, columns, keys: tuple[str, ...] = ("row",)) -> dict:
    """The rows :func:`write_csv` wrote to ``path``: a label (or a tuple of labels named by ``keys``) -> its per-seed
    dicts of ``seed`` and the float ``columns`` (empty cells left out)."""
    rows: dict = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            key = tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]]
            values = {c: float(r[c]) for c in columns if r.get(c)}
            rows.setdefault(key, []).append({"seed": int(r["seed"]), **values})
    return rows
