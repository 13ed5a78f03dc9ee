"""ECO-M2F (Yao et al., "Efficient Transformer Encoders for Mask2Former-style models", ECCV 2024, arXiv:2404.15244,
github.com/GYeow/ECO-M2F): a Mask2Former whose pixel-decoder encoder stops early, at a depth a gate picks per image.
Task ``"eco_m2f"`` (panoptic and semantic segmentation).

- **Early-exit encoder**: the 6-layer deformable encoder of ``mask2former.PixelDecoder`` can stop after layer
  k in 2..6 (the first ``min_exit`` = 2 layers always run); one shared transformer decoder serves every exit.
- **Step A** (training the parent, ``vitlab train --task eco_m2f``): the loss of one exit per step, drawn with
  probability proportional to its depth k ("weighted stochastic depth"): in expectation the loss is
  ``sum_k alpha_k L_k`` with ``alpha_k = k / sum(k)``, weights that grow with depth so the full model stays the
  best while every exit is trained, at the cost of one decoder pass per step. ``exit="all"`` computes that
  expectation exactly (every exit decoded); an int trains one fixed exit.
- **Step B** (``label_exits``): the quality q_k of every training image at every exit (per-image PQ, or mIoU, in
  0..1) and the label ``argmax_k (q_k - beta * k)``; ``exit_qualities`` is the beta-free part, kept for sweeps.
- **Step C** (``train_gate``): the gate average-pools the encoder-input tokens of the lowest-resolution level and
  maps them with one linear layer to exit logits; trained with cross-entropy on the step-B labels, the parent frozen
  (its features are computed once). ``exit="gate"`` runs each image to the arg-max exit of its gate.
- ``encoder_flops``: the measured (``FlopCounterMode``) encoder FLOPs of each exit and of the gate.
- Metrics: PQ (torchmetrics; things = the thing classes, stuff = the background) is the primary metric, being the
  paper's measure and what step B labels with; mIoU of semantic inference, ``mean_exit`` and ``exit_histogram``.

Reconstructed, as the official release holds inference code only (``gating.py``, ``msdeformattn.py``): the
step-A weighting (the paper's "weighted stochastic depth" coefficients, depth-proportional here), the gate's
training (plain cross-entropy, AdamW on cached features) and the quality used in step B. Deviations: the gate is
applied per image inside a batch (the official code takes one arg-max for the whole batch); images leave the
batch at their exit, so their encoder work really stops. The gate's parameters are frozen outside step C, as step A
does not train it. Why depth-proportional: a uniform draw would train the last layer in 1/5 of the steps, this one
in 3/10, and deeper exits weigh more as the coefficients the paper describes do. Mask2Former-lite's own deviations
are in ``mask2former``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...data.loader import BatchLoader
from ...models import Paper
from .._registry import register_task
from ..base import TaskSpec
from .mask2former import Mask2Former

if TYPE_CHECKING:
    from torchmetrics import MetricCollection

__all__ = ["EcoM2F", "encoder_flops", "exit_qualities", "gate_features", "label_exits", "train_gate"]

PAPER = Paper(
    29,
    "Efficient Transformer Encoders for Mask2Former-style models",
    "2404.15244",
    "https://github.com/GYeow/ECO-M2F",
    kind="T+H",
)
_MODES = (None, "all", "gate")  # besides a fixed exit (int) or per-image exits ((B,) tensor)


class EcoM2F(Mask2Former):
    """``Mask2Former`` whose encoder exits after layer k in ``exits`` (2..6), with an exit gate.

    ``forward(image)`` adds ``"exit"`` (B,) int64 to Mask2Former's output (and ``"by_exit"``, one output per exit,
    when ``exit="all"`` in training).

    Args:
        min_exit: the earliest exit (layers before it always run).
        exit: None (training: draw an exit per step; eval: the deepest), an exit in ``exits``, ``"gate"``
            (per image), or ``"all"`` (training: every exit, loss weighted as the draw; eval: the deepest).
        kwargs: ``Mask2Former``'s (backbone, sizes, thresholds).
    """

    task_name = "eco_m2f"

    def __init__(
        self, backbone: str = "tiny_vit_1m_28", *, min_exit: int = 2, exit: int | str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(backbone, **kwargs)
        depth = len(self.pixel_decoder.layers)
        if not 1 <= min_exit <= depth:
            raise ValueError(f"min_exit must be in 1..encoder_layers={depth}, got {min_exit}")
        self.exits = tuple(range(min_exit, depth + 1))
        self.gate = nn.Linear(self.pixel_decoder.dim, len(self.exits))
        nn.init.zeros_(self.gate.bias)
        self.gate.requires_grad_(False)  # trained in step C only (train_gate), on the frozen parent
        alpha = torch.tensor(self.exits, dtype=torch.float32)
        self.register_buffer("exit_weights", alpha / alpha.sum(), persistent=False)  # step A's alpha_k
        self.exit = exit

    @property
    def exit(self) -> int | str | None:
        """How ``forward`` picks the exit (see the class docstring)."""
        return self._exit

    @exit.setter
    def exit(self, value: int | str | None) -> None:
        self._exit = self._check_exit(value)

    def _check_exit(self, value: Any) -> Any:
        if torch.is_tensor(value):
            if value.ndim != 1 or value.dtype != torch.long or not bool(torch.isin(value, self.exit_tensor()).all()):
                raise ValueError(f"per-image exits must be an int64 (B,) tensor of values in {self.exits}")
            return value
        if value in _MODES or (isinstance(value, int) and not isinstance(value, bool) and value in self.exits):
            return value
        raise ValueError(f"exit must be one of {self.exits}, None, 'all' or 'gate', got {value!r}")

    def exit_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The exits as an int64 tensor."""
        return torch.tensor(self.exits, dtype=torch.long, device=device)

    def sample_exit(self, generator: torch.Generator | None = None) -> int:
        """Step A's draw: exit k with probability ``alpha_k`` (proportional to k)."""
        return self.exits[int(torch.multinomial(self.exit_weights.cpu(), 1, generator=generator))]

    @staticmethod
    def _pooled(state: Mapping[str, Any]) -> torch.Tensor:
        """The gate's input: encoder-input tokens of the lowest-resolution level (first), averaged -> (B, dim)."""
        h, w = state["shapes"][0]
        return state["tokens"][:, : h * w].mean(1)

    def gate_features(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> the gate's pooled input ``(B, dim)``."""
        return self._pooled(self.encoder_input(image))

    def _encode_per_image(self, state: Mapping[str, Any], exits: torch.Tensor) -> torch.Tensor:
        """Each image's tokens after its own exit; an image leaves the batch once it reaches it."""
        x, out = state["tokens"], torch.empty_like(state["tokens"])
        rows = torch.arange(x.shape[0], device=x.device)
        for depth in range(1, int(exits.max()) + 1):
            x = self.pixel_decoder.run_layers(x, state, depth - 1, depth)
            done = exits[rows] == depth
            if bool(done.any()):
                out[rows[done]] = x[done]
                x, rows = x[~done], rows[~done]
        return out

    def forward_exits(self, image: torch.Tensor) -> list[dict[str, Any]]:
        """The output at every exit (one encoder run to full depth, one decoder run per exit)."""
        self.check_image(image)
        state = self.encoder_input(image)
        x, outputs, done = state["tokens"], [], 0
        for k in self.exits:
            x = self.pixel_decoder.run_layers(x, state, done, k)
            done = k
            outputs.append({**self.decode(x, state), "exit": torch.full((x.shape[0],), k, device=x.device)})
        return outputs

    def forward_at(self, image: torch.Tensor, exit: int | str | torch.Tensor | None) -> dict[str, Any]:
        """``forward`` with this ``exit`` instead of ``self.exit``."""
        self.check_image(image)
        exit = self._check_exit(exit)
        if not torch.is_tensor(exit) and exit == "all" and self.training:
            outputs = self.forward_exits(image)
            return {**outputs[-1], "by_exit": outputs}
        if exit is None or (not torch.is_tensor(exit) and exit == "all"):
            exit = self.sample_exit() if self.training and exit is None else self.exits[-1]
        state = self.encoder_input(image)
        B = image.shape[0]
        if isinstance(exit, str):  # "gate"
            exit = self.gate(self._pooled(state)).argmax(-1) + self.exits[0]
        if torch.is_tensor(exit):
            if len(exit) != B:
                raise ValueError(f"per-image exits must have one value per image ({B}), got {len(exit)}")
            exits = exit.to(image.device)
            x = self._encode_per_image(state, exits)
        else:
            exits = torch.full((B,), exit, dtype=torch.long, device=image.device)
            x = self.pixel_decoder.run_layers(state["tokens"], state, 0, exit)
        return {**self.decode(x, state), "exit": exits}

    def forward_image(self, image: torch.Tensor) -> dict[str, Any]:
        return self.forward_at(image, self.exit)

    def loss(self, output: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The set loss at the exit taken; with ``"by_exit"`` the ``alpha_k``-weighted sum over all exits."""
        targets = self.targets(batch)
        if "by_exit" not in output:
            return {**self.criterion(output, targets), "exit": output["exit"].float().mean()}
        parts = [self.criterion(o, targets) for o in output["by_exit"]]
        total = sum(w * p["loss"] for w, p in zip(self.exit_weights, parts, strict=True))
        return {**parts[-1], "loss": total}

    def build_metrics(self) -> MetricCollection:
        from torchmetrics.aggregation import CatMetric

        metrics = super().build_metrics()
        metrics.add_metrics({"exit": CatMetric()})
        return metrics

    def update_metrics(self, metrics: MetricCollection, output: Mapping[str, Any], batch: Mapping[str, Any]) -> None:
        super().update_metrics(metrics, output, batch)
        metrics["exit"].update(output["exit"].float().to(metrics["exit"].device))

    def summarize_metrics(self, metrics: MetricCollection) -> dict[str, float | list]:
        """Mask2Former's summary plus ``mean_exit`` and ``exit_histogram`` (images per exit, ``exits`` order)."""
        exits = torch.as_tensor(metrics["exit"].compute()).long().flatten().cpu()
        histogram = [int((exits == k).sum()) for k in self.exits]
        mean_exit = float(exits.float().mean()) if len(exits) else 0.0
        return {**super().summarize_metrics(metrics), "mean_exit": mean_exit, "exit_histogram": histogram}


def _batches(
    dataset: Any, batch_size: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Iterator:
    """Normalised dict batches of a scene data set, in order."""
    if len(dataset) == 0:
        raise ValueError("the data set is empty: steps B and C need at least one scene")
    return BatchLoader(dataset, batch_size, shuffle=False, mean=mean, std=std).iter_batches(0)


@torch.no_grad()
def exit_qualities(
    model: EcoM2F,
    dataset: Any,
    *,
    metric: str = "pq",
    batch_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """Step B's measurements: ``(N, len(exits))`` quality in 0..1 of each scene at each exit (per-image PQ with
    torchmetrics' ``panoptic_quality``, or per-image mIoU), in the data set's order. Runs in eval mode."""
    from torchmetrics.functional.classification import multiclass_jaccard_index
    from torchmetrics.functional.detection import panoptic_quality

    if metric not in ("pq", "miou"):
        raise ValueError(f"metric must be 'pq' or 'miou', got {metric!r}")
    model.eval()
    things, stuffs = set(range(1, model.num_classes)), {0}
    rows = []
    for batch in _batches(dataset, batch_size, mean, std):
        target = torch.stack([batch["semantic"], batch["panoptic"]], -1)
        per_exit = []
        for out in model.forward_exits(batch["image"]):
            pred = model.predict(out)
            if metric == "pq":
                panoptic = torch.stack([pred["category"], pred["instance"]], -1)
                q = [
                    panoptic_quality(panoptic[i : i + 1], target[i : i + 1], things, stuffs) for i in range(len(target))
                ]
            else:
                q = [
                    multiclass_jaccard_index(p, t, model.num_classes)
                    for p, t in zip(pred["semantic"], batch["semantic"], strict=True)
                ]
            per_exit.append(torch.stack(q).float().nan_to_num(0.0))
        rows.append(torch.stack(per_exit, 1))
    return torch.cat(rows)


def label_exits(
    model: EcoM2F, dataset: Any, beta: float, *, qualities: torch.Tensor | None = None, **kwargs: Any
) -> torch.Tensor:
    """Step B's labels ``argmax_k (q_k - beta * k)`` per scene, ``(N,)`` int64 exits (ties go to the cheaper exit).

    ``qualities`` (from ``exit_qualities``) skips the measuring, so a beta sweep costs nothing more; ``kwargs`` go
    to ``exit_qualities``.
    """
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0 (the price of one encoder layer in quality), got {beta!r}")
    q = exit_qualities(model, dataset, **kwargs) if qualities is None else qualities
    exits = model.exit_tensor()
    if q.ndim != 2 or q.shape[1] != len(exits):
        raise ValueError(
            f"qualities must be (N, {len(exits)}) (one column per exit {model.exits}), got {tuple(q.shape)}"
        )
    return exits[(q - beta * exits.to(q.dtype)).argmax(1)]


@torch.no_grad()
def gate_features(model: EcoM2F, dataset: Any, *, batch_size: int = 64, **kwargs: Any) -> torch.Tensor:
    """The gate's input ``(N, dim)`` for every scene of ``dataset`` (eval mode); ``kwargs``: ``mean``, ``std``."""
    model.eval()
    return torch.cat([model.gate_features(b["image"]) for b in _batches(dataset, batch_size, **kwargs)])


def train_gate(
    model: EcoM2F,
    dataset: Any,
    labels: torch.Tensor,
    *,
    features: torch.Tensor | None = None,
    epochs: int = 200,
    lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> list[float]:
    """Step C: fit the gate to the step-B ``labels`` (exits, one per scene) by cross-entropy; only the gate changes.

    The parent is frozen, so its pooled features are computed once (eval mode; or pass ``features``, the data set's
    ``gate_features``, to reuse them over a beta sweep); the gate starts afresh (seeded) and is trained on them with
    AdamW in shuffled mini-batches. Returns the mean loss of each epoch.
    """
    if features is None:
        features = gate_features(model, dataset, batch_size=batch_size, mean=mean, std=std)
    exits = model.exit_tensor(labels.device)
    if labels.shape != (len(features),) or not bool(torch.isin(labels, exits).all()):
        raise ValueError(f"labels must be ({len(features)},) exits in {model.exits}, one per scene")
    target = (labels - exits[0]).to(features.device)
    with torch.random.fork_rng(devices=[]):  # a fresh, seeded gate: a beta sweep's gates do not inherit
        torch.manual_seed(seed)
        model.gate.reset_parameters()
        nn.init.zeros_(model.gate.bias)
    g = torch.Generator().manual_seed(seed)
    model.gate.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.gate.parameters(), lr=lr, weight_decay=0.0)
    history = []
    try:
        for _ in range(epochs):
            total = 0.0
            for idx in torch.randperm(len(features), generator=g).split(batch_size):
                loss = F.cross_entropy(model.gate(features[idx]), target[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
            history.append(total / len(features))
    finally:
        model.gate.requires_grad_(False)
    return history


def _grid_sample_flops(*args: Any, out_shape: Sequence[int], **kwargs: Any) -> int:
    return 8 * math.prod(out_shape)  # bilinear: 4 weights x value, multiply-add each


@torch.no_grad()
def encoder_flops(model: EcoM2F) -> dict[int | str, int]:
    """Measured FLOPs per image of the encoder at each exit, and of the gate (key ``"gate"``), at ``img_size``.

    Counts ``FlopCounterMode``'s ops (matmuls) plus the deformable sampling (``grid_sampler_2d``, 8 FLOPs per
    sampled value), on the encoder layers only: the input projections and the rest run at every exit alike.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    image = torch.zeros(1, model.in_chans, model.img_size, model.img_size, device=model.gate.weight.device)
    state = model.encoder_input(image)
    out: dict[int | str, int] = {}
    for key in (*model.exits, "gate"):
        with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.grid_sampler_2d: _grid_sample_flops}) as c:
            if key == "gate":
                model.gate(model._pooled(state))
            else:
                model.pixel_decoder.run_layers(state["tokens"], state, 0, key)
        out[key] = c.get_total_flops()
    model.train(was_training)
    return out


# "all": one training step reaches every exit's layers (the expectation of the per-step draw)
_TINY = {"img_size": 32, "dim": 16, "num_queries": 6, "encoder_heads": 2, "encoder_points": 2, "encoder_ffn": 32}
_TINY |= {"decoder_layers": 3, "decoder_heads": 2, "decoder_ffn": 32, "exit": "all"}

register_task(
    TaskSpec(
        name="eco_m2f",
        task="segmentation",
        builder=EcoM2F,
        metric="pq",
        paper=PAPER,
        kind="T+H",
        ref_metric=52.06,
        ref_source="ECO-M2F Swin-T, COCO panoptic PQ at beta = 0.0005, 202.39 total GFLOPs (official README)",
        default_backbone="tiny_vit_1m_28",
        description="Mask2Former-lite whose deformable encoder exits after 2..6 layers, at a depth a gate picks",
        test_kwargs=_TINY,
    )
)
