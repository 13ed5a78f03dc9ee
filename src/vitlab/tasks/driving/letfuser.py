"""LeTFuser: multi-camera transformer sensor fusion with multi-task learning for end-to-end driving (paper 38).

LeTFuser: Light-weight End-to-end Transformer-Based Sensor Fusion for Autonomous Driving with Multi-Task Learning
(Agand et al., arXiv:2310.13135; official code https://github.com/pagand/e2etransfuser branch ``cvpr-w``, folder
``x13/``, read for the mechanisms only, no code taken). Implemented: the three cameras (left, front, right)
concatenated side by side into one wide image through one backbone (CvT in the paper; any vitlab/timm backbone
by name here, a pyramid neck on top); a segmentation + depth decoder on the finest map; the semantic depth cloud
(predicted class probabilities and depth unprojected with each camera's ``K`` and ``cam_to_ego`` into a top-down
grid, :class:`.letfuser_parts.SemanticDepthCloud`) encoded by a small CNN; fusion of the pooled image features, the
SDC code and the measurements (speed, command, route target); a traffic-light head whose probabilities also feed the
planner; a GRU waypoint decoder (cumulative offsets); and the loss ``seg CE + depth L1 + light CE + waypoint L1``
weighted by GradNorm (alpha 1.5, on a shared 1x1 layer every head reads through) or by fixed weights.
The controller (PID on the waypoints) and the closed-loop world are :mod:`vitlab.data.synthetic.driving`.

Options for the ablations: ``cameras`` "three" | "front", ``sdc`` on/off, ``tasks`` "all" | "waypoints" (the
waypoint loss alone; the seg/depth decoder is then only built when the SDC needs it), ``per_camera`` (each camera
through the backbone alone, then side by side: the wide image's convolutions and attention cross camera borders).

Deviations: CvT-13 pretrained on ImageNet with a conv stem -> a tiny CvT trained from scratch (the benchmark gives
its ``backbone_kwargs``); 23 CARLA classes -> the 6 of the toy world; EfficientNet-B1 on the SDC -> a 2-layer CNN;
the paper's per-camera rotations and fixed focal -> the rig's calibrated ``K``/``cam_to_ego`` (batch inputs, the
default rig when absent); the U-Net decoder over the CvT stages -> the pyramid neck's top-down fusion and a conv head;
no second (policy) GRU / MLP controller and no "one_of" control blending: control is the PID on the waypoints;
square per-camera images (the task contract's ``img_size``), e.g. 3 x 32 x 32 instead of 3 x 160 x 256.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...data.synthetic.driving import CLASSES, MEASUREMENT_DIM, NUM_WAYPOINTS, rig_cameras
from ...layers.camera import check_intrinsics, check_pose
from ...models import Paper
from .._backbone import BackbonePyramid
from .._registry import register_task
from ..base import TaskSpec
from ..video.base import VideoTaskModel
from .letfuser_parts import GradNorm, GRUWaypointDecoder, SemanticDepthCloud, seg_ce

if TYPE_CHECKING:
    from torchmetrics import MetricCollection

__all__ = ["PAPER", "LeTFuser", "driving_adapter"]

PAPER = Paper(38, "LeTFuser: Light-weight End-to-end Transformer-Based Sensor Fusion for Autonomous Driving with "
              "Multi-Task Learning", "2310.13135", "https://github.com/pagand/e2etransfuser", kind="H")  # fmt: skip
MAX_DEPTH = 40.0  # m: the depth head's range (sigmoid x MAX_DEPTH); farther targets are clamped


class LeTFuser(VideoTaskModel):
    """Camera views ``(B, V, 3, S, S)`` (V = 3: left, front, right; 1: front) -> ``{"waypoints": (B, K, 2),
    "light": (B, 2) logits, "seg": (B, V, C, S, S) logits, "depth": (B, V, S, S) m}`` (``seg``/``depth`` only when the
    decoder is built). The semantic classes are the driving world's C = 6 (``CLASSES``); ``num_classes`` is unused
    (the engine gives multi-view sets one "class", as for dust3r).

    Forward keywords (batch keys): ``measurements`` (B, 6), ``K`` (B, V, 3, 3), ``cam_to_ego`` (B, V, 4, 4); absent
    ones default to zeros and the world's rig.
    """

    task_name = "letfuser"
    batch_keys = ("image", "measurements", "K", "cam_to_ego")
    target_keys = ("waypoints", "light", "semantic", "depth")
    primary_metric = "ade"
    higher_is_better = False

    def __init__(
        self,
        backbone: str = "cvt_13_224",
        *,
        num_classes: int = 1,
        in_chans: int = 3,
        img_size: int = 32,
        backbone_kwargs: dict[str, Any] | None = None,
        cameras: str = "three",
        sdc: bool = True,
        tasks: str = "all",
        per_camera: bool = False,
        gradnorm: bool = True,
        loss_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        channels: int = 64,
        hidden: int = 64,
        sdc_grid: int = 16,
        alpha: float = 1.5,
    ) -> None:
        if cameras not in ("three", "front"):
            raise ValueError(f"cameras={cameras!r}; expected 'three' (left, front, right) or 'front'")
        if tasks not in ("all", "waypoints"):
            raise ValueError(f"tasks={tasks!r}; expected 'all' (seg, depth, light, waypoints) or 'waypoints'")
        if in_chans != 3:
            raise ValueError(f"in_chans must be 3 (RGB cameras), got {in_chans}")
        views = 3 if cameras == "three" else 1
        super().__init__(backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size, num_frames=views)
        self.cameras, self.sdc, self.tasks, self.per_camera = cameras, sdc, tasks, per_camera
        self.seg_classes = seg = len(CLASSES)
        self.pyramid = BackbonePyramid(backbone, in_chans=3, img_size=img_size, out_channels=channels,
                                       backbone_kwargs=backbone_kwargs)  # fmt: skip
        self.shared = nn.Conv2d(channels, channels, 1)  # the layer every head reads through (GradNorm's W)
        self.decoder = None
        if tasks == "all" or sdc:  # class logits and depth on the finest map
            self.decoder = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(),
                                         nn.Conv2d(channels, seg + 1, 1))  # fmt: skip
        self.cloud = SemanticDepthCloud(seg, sdc_grid) if sdc else None
        fused_in = channels * 2 * views + hidden + (self.cloud.out_dim if sdc else 0)
        self.measure = nn.Sequential(nn.Linear(MEASUREMENT_DIM, hidden), nn.GELU())
        self.fuse = nn.Sequential(nn.Linear(fused_in, hidden * 2), nn.GELU(), nn.Linear(hidden * 2, hidden), nn.GELU())
        self.light_head = nn.Linear(hidden, 2)
        self.planner = GRUWaypointDecoder(hidden, NUM_WAYPOINTS, extra=4)  # route target (2) + light probs (2)
        names = ("seg", "depth", "light", "waypoints") if tasks == "all" else ("waypoints",)
        self.loss_names = names
        self.weighting = GradNorm(len(names), alpha) if gradnorm and len(names) > 1 else None
        self.register_buffer("fixed_weights", torch.tensor(loss_weights if tasks == "all" else (1.0,)))
        K, cam_to_ego = rig_cameras(img_size, cameras)
        self.register_buffer("rig_K", K, persistent=False)
        self.register_buffer("rig_pose", cam_to_ego, persistent=False)

    def forward(self, batch_or_image: Any, measurements: torch.Tensor | None = None, K: torch.Tensor | None = None,
                cam_to_ego: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """Views (or a batch dict holding ``image`` and the forward keywords) -> raw outputs (class docstring)."""
        if isinstance(batch_or_image, Mapping):
            if "image" not in batch_or_image:
                raise ValueError(f"batch has no 'image' (keys: {sorted(batch_or_image)})")
            kw = self.forward_kwargs(batch_or_image)
            measurements = kw.get("measurements") if measurements is None else measurements
            K = kw.get("K") if K is None else K
            cam_to_ego = kw.get("cam_to_ego") if cam_to_ego is None else cam_to_ego
            batch_or_image = batch_or_image["image"]
        self.check_image(batch_or_image)
        B, V = batch_or_image.shape[:2]
        K = self.rig_K.expand(B, -1, -1, -1) if K is None else K
        cam_to_ego = self.rig_pose.expand(B, -1, -1, -1) if cam_to_ego is None else cam_to_ego
        measurements = batch_or_image.new_zeros(B, MEASUREMENT_DIM) if measurements is None else measurements
        self._check_inputs(B, V, measurements, K, cam_to_ego)
        return self._forward(batch_or_image, measurements, K, cam_to_ego)

    def _check_inputs(self, B: int, V: int, measurements: Any, K: Any, cam_to_ego: Any) -> None:
        for name, value, shape in (("measurements", measurements, (B, MEASUREMENT_DIM)), ("K", K, (B, V, 3, 3)),
                                   ("cam_to_ego", cam_to_ego, (B, V, 4, 4))):  # fmt: skip
            if not torch.is_tensor(value) or tuple(value.shape) != shape or not value.is_floating_point():
                got = f"{value.dtype} {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
                raise ValueError(
                    f"{name} must be float {shape} (one per camera of the {self.cameras!r} rig), got {got}"
                )
        if not torch.compiler.is_compiling():
            check_intrinsics(K)
            check_pose(cam_to_ego, "cam_to_ego")

    def forward_kwargs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: batch[k] for k in ("measurements", "K", "cam_to_ego") if k in batch}

    def _features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Views -> pyramid maps (B, C, h, V * w): the wide image, or each camera alone placed side by side."""
        B, V, C, S, _ = image.shape
        if not self.per_camera:
            maps = self.pyramid(image.permute(0, 2, 3, 1, 4).reshape(B, C, S, V * S))
        else:
            maps = [m.unflatten(0, (B, V)).permute(0, 2, 3, 1, 4).flatten(3) for m in self.pyramid(image.flatten(0, 1))]
        return [self.shared(m) for m in maps]

    def _forward(self, image, measurements, K, cam_to_ego) -> dict[str, torch.Tensor]:
        V, S = image.shape[1], image.shape[-1]
        maps = self._features(image)
        out: dict[str, torch.Tensor] = {}
        pooled = sum(F.adaptive_avg_pool2d(m, (1, 2 * V)) for m in maps)  # every pyramid level, 2 cells per camera
        parts = [pooled.flatten(1), self.measure(measurements)]
        if self.decoder is not None:
            dense = F.interpolate(self.decoder(maps[0]), size=(S, V * S), mode="bilinear", align_corners=False)
            dense = dense.unflatten(3, (V, S)).permute(0, 3, 1, 2, 4)  # (B, V, C + 1, S, S)
            out["seg"], out["depth"] = dense[:, :, :-1], MAX_DEPTH * dense[:, :, -1].sigmoid()
            if self.cloud is not None:
                parts.append(self.cloud(out["seg"].softmax(2), out["depth"], K, cam_to_ego))
        h = self.fuse(torch.cat(parts, 1))
        out["light"] = self.light_head(h)
        out["waypoints"] = self.planner(h, torch.cat([measurements[:, -2:], out["light"].softmax(1)], 1))
        return out

    def forward_image(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return self(image)

    def _target(self, batch: Mapping[str, Any], key: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        if key not in batch:
            raise ValueError(f"batch has no {key!r} target (keys: {sorted(batch)})")
        t = batch[key]
        if not torch.is_tensor(t) or tuple(t.shape) != shape or t.dtype != dtype:
            got = f"{t.dtype} {tuple(t.shape)}" if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"batch[{key!r}] must be {dtype} {shape}, got {got}")
        return t

    def _targets(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        B = output["waypoints"].shape[0]
        V, S = self.num_frames, self.img_size
        return {"waypoints": self._target(batch, "waypoints", (B, NUM_WAYPOINTS, 2), torch.float32),
                "light": self._target(batch, "light", (B,), torch.int64),
                "semantic": self._target(batch, "semantic", (B, V, S, S), torch.int64),
                "depth": self._target(batch, "depth", (B, V, S, S), torch.float32)}  # fmt: skip

    def task_losses(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The four task losses (only ``waypoints`` when ``tasks="waypoints"``)."""
        t = self._targets(output, batch)
        losses = {"waypoints": F.l1_loss(output["waypoints"], t["waypoints"])}
        if self.tasks == "all":
            valid = t["depth"] > 0
            err = (output["depth"] - t["depth"].clamp(max=MAX_DEPTH)).abs() / 10  # per 10 m
            losses["seg"] = seg_ce(output["seg"], t["semantic"])
            losses["depth"] = (err * valid).sum() / valid.sum().clamp(min=1)
            losses["light"] = F.cross_entropy(output["light"], t["light"])
        return losses

    def loss(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Weighted sum of the task losses: GradNorm weights (trained on the shared layer), or fixed ones."""
        parts = self.task_losses(output, batch)
        stacked = torch.stack([parts[k] for k in self.loss_names])
        if self.weighting is not None:
            total, logs = self.weighting(stacked, self.shared.weight)
        else:
            total, logs = (self.fixed_weights * stacked).sum(), {}
        return {"loss": total, **{f"{k}_loss": v.detach() for k, v in parts.items()}, **logs}

    def build_metrics(self) -> MetricCollection:
        from torchmetrics import MeanMetric, MetricCollection
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        metrics = {"ade": MeanMetric(), "fde": MeanMetric(), "light_acc": MulticlassAccuracy(2, average="micro")}
        if self.decoder is not None:
            metrics["miou"] = MulticlassJaccardIndex(self.seg_classes, average="macro")
            metrics["depth_mae"] = MeanMetric()
        return MetricCollection(metrics)

    def update_metrics(self, metrics: MetricCollection, output: Any, batch: Mapping[str, Any]) -> None:
        t = self._targets(output, batch)
        dist = (output["waypoints"] - t["waypoints"]).norm(dim=-1)  # (B, K) m
        metrics["ade"].update(dist.mean(1))
        metrics["fde"].update(dist[:, -1])
        metrics["light_acc"].update(output["light"].argmax(1), t["light"])
        if "miou" in metrics:
            metrics["miou"].update(output["seg"].argmax(2).flatten(), t["semantic"].flatten())
            valid = t["depth"] > 0
            metrics["depth_mae"].update((output["depth"] - t["depth"]).abs()[valid])

    def summarize_metrics(self, metrics: MetricCollection) -> dict[str, float | list]:
        """``ade``/``fde`` (m), ``light_acc`` (%), and with the decoder ``miou`` (%) and ``depth_mae`` (m)."""
        out = {k: float(metrics[k].compute()) for k in ("ade", "fde")}
        out["light_acc"] = 100.0 * float(metrics["light_acc"].compute())
        if "miou" in metrics:
            out["miou"] = 100.0 * float(metrics["miou"].compute())
            out["depth_mae"] = float(metrics["depth_mae"].compute())
        return out

    def postprocess(self, output: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"waypoints": (B, K, 2), "light": (B,) 0 green / 1 red}`` plus ``semantic`` (B, V, S, S) and ``depth``
        when the decoder is built."""
        pred = {"waypoints": output["waypoints"], "light": output["light"].argmax(1)}
        if "seg" in output:
            pred |= {"semantic": output["seg"].argmax(2), "depth": output["depth"]}
        return pred

    def draw_prediction(self, raw: Mapping[str, torch.Tensor], pred: Mapping[str, torch.Tensor], batch: Any) -> Any:
        """``vitlab predict``: a row per sample of ``raw`` (a collated driving batch): the views, the predicted classes
        (when decoded) and a top-down panel with the expert's waypoints (blue) and the model's (orange) over the
        ego car (black); the panel's border is the predicted light (red / green)."""
        return draw_driving_rows(raw, pred)

    def example_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random views, measurements and targets with the world's rig (deterministic for a seeded ``generator``)."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        B, V, S = batch_size, self.num_frames, self.img_size
        steps = torch.rand(B, NUM_WAYPOINTS, 2, generator=g) * torch.tensor([2.0, 0.4]) - torch.tensor([0.0, 0.2])
        depth = torch.rand(B, V, S, S, generator=g) * 30
        depth[..., : S // 3, :] = 0  # the sky
        return {
            "image": self.example_clips(B, g),
            "measurements": torch.randn(B, MEASUREMENT_DIM, generator=g) * 0.3,
            "K": self.rig_K.expand(B, -1, -1, -1).clone(),
            "cam_to_ego": self.rig_pose.expand(B, -1, -1, -1).clone(),
            "waypoints": steps.cumsum(1),
            "light": torch.randint(0, 2, (B,), generator=g),
            "semantic": torch.randint(0, self.seg_classes, (B, V, S, S), generator=g),
            "depth": depth,
        }

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, cameras={self.cameras!r}, sdc={self.sdc}, tasks={self.tasks!r}, "
                f"per_camera={self.per_camera}, gradnorm={self.weighting is not None}")  # fmt: skip


def draw_driving_rows(raw: Mapping[str, torch.Tensor], pred: Mapping[str, torch.Tensor], scale: int = 4) -> Any:
    """:meth:`LeTFuser.draw_prediction`'s picture (PIL image)."""
    import numpy as np
    from PIL import Image, ImageDraw

    palette = np.array([[140, 190, 240], [90, 90, 96], [255, 255, 255], [240, 150, 30], [230, 30, 30], [30, 215, 50]])
    rows = []
    for b in range(raw["views"].shape[0]):
        views = raw["views"][b]
        S = views.shape[-1]
        tiles = [torch.cat(list(views), -1).permute(1, 2, 0).numpy()]
        if "semantic" in pred:
            tiles.append(palette[torch.cat(list(pred["semantic"][b]), -1).clamp(max=5).numpy()].astype(np.uint8))
        panel = Image.new("RGB", (S * scale, S * scale), (235, 235, 235))
        draw = ImageDraw.Draw(panel)
        metres = S * scale / 12.0  # 12 m ahead fill the panel; ego at the bottom centre

        def to_px(p, m=metres, side=S * scale):
            return [(side / 2 - float(y) * m, side - 4 - float(x) * m) for x, y in p]

        u0, v0 = S * scale / 2, S * scale - 4
        draw.rectangle((u0 - 0.5 * metres, v0 - metres, u0 + 0.5 * metres, v0 + metres), fill=(0, 0, 0))
        for wps, colour in ((raw["waypoints"][b], (40, 90, 220)), (pred["waypoints"][b], (245, 130, 20))):
            pts = to_px(wps.tolist())
            draw.line(pts, fill=colour, width=2)
            for u, v in pts:
                draw.ellipse((u - 3, v - 3, u + 3, v + 3), fill=colour)
        red = int(pred["light"][b]) == 1
        draw.rectangle((0, 0, S * scale - 1, S * scale - 1), outline=(230, 30, 30) if red else (30, 200, 50), width=3)
        big = [np.asarray(Image.fromarray(t).resize((t.shape[1] * scale, t.shape[0] * scale), Image.NEAREST))
               for t in tiles]  # fmt: skip
        rows.append(np.concatenate([*big, np.asarray(panel)], 1))
    return Image.fromarray(np.concatenate(rows, 0))


def driving_adapter(task_kwargs: dict[str, Any]):
    """``TaskSpec.data_adapter``: the driving set with 3 cameras (or 1 for ``cameras="front"``), renamed to this
    task's batch (``views`` -> ``image``, left uint8 for the engine's loader)."""
    views = 1 if task_kwargs.get("cameras", "three") == "front" else 3

    def convert(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"image": batch["views"], **{k: v for k, v in batch.items() if k != "views"}}

    return views, convert


register_task(
    TaskSpec(
        name="letfuser",
        task="driving",
        builder=LeTFuser,
        metric="ade",
        higher_is_better=False,
        paper=PAPER,
        kind="H",
        dataset="driving",
        num_classes=1,
        in_chans=3,
        img_size=32,
        default_backbone="cvt_13_224",
        description="cameras side by side through one backbone, seg + depth decoder, semantic depth cloud, fusion "
        "with measurements, traffic-light head, GRU waypoints; GradNorm-weighted multi-task loss",
        test_backbones=("vit_micro_patch4_28", "cvt_13_224"),
        test_kwargs={"img_size": 16, "channels": 16, "hidden": 16, "sdc_grid": 8},
        data_adapter=driving_adapter,
    )
)
