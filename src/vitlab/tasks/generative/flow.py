"""``flow_dit``: a small class-conditional DiT trained by flow matching (rectified flow), sampled by an ODE solver.

The velocity network is DiT (Peebles & Xie, arXiv:2212.09748): an isotropic ViT's patch embedding and blocks
(``PlainViTTrunk``, any plain vitlab or timm ViT by name), every block turned into an adaLN-Zero block
(``layers.dit``) conditioned on the time and the class, and a zero-initialised patch output layer. The objective
is flow matching on the linear path of rectified flow (Lipman et al., arXiv:2210.02747; Liu et al.,
arXiv:2209.03003): ``x_t = (1 - t) x0 + t eps`` between data ``x0`` (t = 0) and noise ``eps`` (t = 1), the network
regresses the velocity ``eps - x0`` (MSE), ``t`` drawn logit-normal (SD3, arXiv:2403.03206) or uniform.
Classifier-free guidance (Ho & Salimans, arXiv:2207.12598): labels are replaced by the "no class" id with
probability ``class_dropout`` while training; ``sample(cfg=w)`` uses ``v_null + w (v_class - v_null)``.

``forward`` returns ``{"velocity", "target", "t"}``: in training mode ``t`` and ``eps`` are random draws; in eval
mode they are fixed (image ``i`` of a batch at ``t = (i mod 8 + 0.5) / 8``, noise from a generator seeded with
``eval_seed``), so the held-out flow loss (``flow_loss``, the metric) is deterministic. Images are the normalised
images of the data set; samples come back in the same space. Deviations from DiT: the host ViT's learned
position embedding (DiT: fixed sine-cosine), no learned output variance (a flow, not a DDPM).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...layers.dit import AdaLNZeroBlock, DiTOutputLayer, LabelEmbedder, TimestepEmbedder, unpatchify
from .._backbone import PlainViTTrunk
from .._registry import register_task
from ..base import TaskModel, TaskSpec

if TYPE_CHECKING:
    from torchmetrics import MetricCollection

__all__ = ["FlowDiT", "FlowMetrics", "grid_picture"]

T_SAMPLING = ("logit_normal", "uniform")
SOLVERS = ("euler", "heun")
EVAL_TIMES = 8  # the eval loss's fixed times: (k + 0.5) / 8


class FlowMetrics:
    """The metric and prediction of the flow-matching task models (``flow_dit``, ``mv_adapter``, ``modular_cam``):
    ``flow_loss``, the held-out MSE between predicted and true velocity at fixed times and noise, per sample."""

    target_keys: tuple[str, ...] = ()
    primary_metric = "flow_loss"
    higher_is_better = False

    def build_metrics(self) -> MetricCollection:
        from torchmetrics import MeanMetric, MetricCollection

        return MetricCollection({"flow_loss": MeanMetric()})

    def update_metrics(self, metrics: MetricCollection, output: Any, batch: Mapping[str, Any]) -> None:
        metrics["flow_loss"].update((output["velocity"] - output["target"]).pow(2).flatten(1).mean(1))

    def summarize_metrics(self, metrics: MetricCollection) -> dict[str, float | list]:
        """``{"flow_loss": the held-out flow loss at the fixed eval times and noise}``."""
        return {"flow_loss": float(metrics["flow_loss"].compute())}

    def postprocess(self, output: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"velocity": ...}``: a generator predicts no batch target (``sample`` makes images, views or clips)."""
        return {"velocity": output["velocity"]}


def grid_picture(tiles: torch.Tensor, nrow: int, scale: int = 4) -> Any:
    """Images ``(N, C, H, W)`` in [0, 1] -> a PIL sheet, ``nrow`` per row with 1 px white gaps, enlarged ``scale``x."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(tiles.float().cpu(), nrow=nrow, padding=1, pad_value=1.0)
    picture = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(picture.repeat(scale, 0).repeat(scale, 1))


class FlowDiT(FlowMetrics, TaskModel):
    """A DiT velocity network on an isotropic backbone's blocks, trained by flow matching (module docstring).

    Args:
        class_cond: condition on ``batch["label"]`` (class ids); False: unconditional.
        class_dropout: probability of dropping a label to "no class" while training (guidance).
        t_sampling: "logit_normal" (``sigmoid(N(0, 1))``) or "uniform" training times.
        eval_seed: seed of the fixed eval noise.
    """

    task_name = "flow_dit"
    batch_keys = ("image",)

    def __init__(
        self,
        backbone: str = "vit_micro_patch4_28",
        *,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        backbone_kwargs: dict[str, Any] | None = None,
        class_cond: bool = True,
        class_dropout: float = 0.1,
        t_sampling: str = "logit_normal",
        eval_seed: int = 2024,
    ) -> None:
        super().__init__(backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        if t_sampling not in T_SAMPLING:
            raise ValueError(f"t_sampling must be one of {T_SAMPLING}, got {t_sampling!r}")
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"class_dropout must be in [0, 1), got {class_dropout!r}")
        self.trunk = PlainViTTrunk(backbone, in_chans=in_chans, img_size=img_size, backbone_kwargs=backbone_kwargs)
        if img_size % self.trunk.patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of {backbone!r}'s patch {self.trunk.patch_size}")
        dim = self.trunk.embed_dim
        # the host's blocks become adaLN-Zero blocks (their mixers and MLPs move here); the host keeps none
        self.blocks = nn.Sequential(*[AdaLNZeroBlock.adopt(b, dim) for b in self.trunk.backbone.blocks])
        self.trunk.backbone.blocks = nn.Sequential()
        self.t_embed = TimestepEmbedder(dim)
        self.y_embed = LabelEmbedder(num_classes, dim) if class_cond else None
        self.final = DiTOutputLayer(dim, self.trunk.patch_size, in_chans)
        self.class_cond, self.class_dropout, self.t_sampling, self.eval_seed = (
            class_cond, class_dropout, t_sampling, eval_seed
        )  # fmt: skip

    # -- input checks -------------------------------------------------------------------------------------------
    def check_image(self, image: Any) -> None:
        """The base checks, plus ``img_size`` square images and finite pixels (skipped while compiling)."""
        super().check_image(image)
        if tuple(image.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"image must be {self.img_size}x{self.img_size} px (built with img_size={self.img_size}), got "
                f"{image.shape[-2]}x{image.shape[-1]}"
            )
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(image).all()):
            raise ValueError("image holds NaN or infinite values")

    def check_labels(self, label: Any, batch_size: int) -> torch.Tensor | None:
        """``label`` as int64 ``(batch_size,)`` class ids in ``[0, num_classes)``, or None (unconditional)."""
        if label is None or not self.class_cond:
            return None
        if not isinstance(label, torch.Tensor) or label.dtype != torch.long or tuple(label.shape) != (batch_size,):
            got = f"{label.dtype} {tuple(label.shape)}" if isinstance(label, torch.Tensor) else type(label).__name__
            raise ValueError(f"label must be int64 ({batch_size},) class ids, got {got}")
        if batch_size and (int(label.min()) < 0 or int(label.max()) >= self.num_classes):
            raise ValueError(
                f"label must hold class ids in [0, {self.num_classes}), got values in "
                f"[{int(label.min())}, {int(label.max())}]"
            )
        return label

    # -- the velocity network -----------------------------------------------------------------------------------
    def condition(self, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """The adaLN conditioning vector ``(B, dim)``: time embedding + class embedding (None: the "no class" id)."""
        c = self.t_embed(t)
        if self.y_embed is None:
            return c
        if label is None:
            label = torch.full((t.shape[0],), self.y_embed.null_id, dtype=torch.long, device=t.device)
        return c + self.y_embed(label)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """``v(x_t, t, label)``: ``x`` (B, C, H, W), ``t`` (B,) in [0, 1], label ids (``num_classes``: none)."""
        tokens, grid = self.trunk.embed(x)
        c = self.condition(t, label)
        for block in self.blocks:
            tokens = block(tokens, c, grid)
        out = self.final(tokens[:, self.trunk.num_prefix_tokens :], c)
        return unpatchify(out, grid, self.trunk.patch_size, self.in_chans)

    # -- the flow-matching objective ----------------------------------------------------------------------------
    def forward(
        self, batch_or_image: torch.Tensor | Mapping[str, Any], label: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The normalised image (or a batch dict holding ``image`` and ``label``) -> velocity, target and times."""
        if isinstance(batch_or_image, Mapping):
            label = batch_or_image.get("label", label)
        image = batch_or_image
        if isinstance(image, Mapping):
            if "image" not in image:
                raise ValueError(f"batch has no 'image' (keys: {sorted(image)})")
            image = image["image"]
        self.check_image(image)
        return self.forward_image(image, self.check_labels(label, image.shape[0]))

    def forward_kwargs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {"label": batch["label"]} if "label" in batch else {}

    def forward_image(self, image: torch.Tensor, label: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        B = image.shape[0]
        t, noise = self._draw(image)
        if label is not None and self.training and self.class_dropout > 0:
            drop = torch.rand(B, device=image.device) < self.class_dropout
            label = torch.where(drop, torch.full_like(label, self.num_classes), label)
        tb = t.view(B, 1, 1, 1)
        x_t = (1 - tb) * image + tb * noise
        return {"velocity": self.velocity(x_t, t, label), "target": noise - image, "t": t}

    def _draw(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Times ``(B,)`` and noise like ``image``: random in training, fixed in eval mode."""
        B = image.shape[0]
        if self.training:
            u = torch.randn(B, device=image.device)
            t = torch.sigmoid(u) if self.t_sampling == "logit_normal" else torch.rand(B, device=image.device)
            return t, torch.randn_like(image)
        g = torch.Generator().manual_seed(self.eval_seed)
        noise = torch.randn(image.shape, generator=g).to(image.device, image.dtype)
        t = (torch.arange(B, device=image.device) % EVAL_TIMES + 0.5) / EVAL_TIMES
        return t.to(image.dtype), noise

    def loss(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``{"loss": mean squared velocity error}``."""
        return {"loss": F.mse_loss(output["velocity"], output["target"])}

    # -- sampling -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        steps: int = 20,
        cfg: float = 1.0,
        solver: str = "euler",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``n`` images ``(n, C, H, W)`` (normalised space) by integrating the flow from noise (t = 1) to t = 0.

        Args:
            labels: ``(n,)`` class ids, or None for unconditional samples.
            steps: ODE steps (Heun: two network calls per step but the last).
            cfg: guidance scale ``w``; 1 is plain conditional sampling (needs ``labels`` when not 1).
            generator: the initial noise's generator (CPU); the samples are a function of it.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if not cfg >= 0:
            raise ValueError(f"cfg must be >= 0, got {cfg!r}")
        labels = self.check_labels(labels, n)
        if cfg != 1.0 and labels is None:
            raise ValueError("cfg != 1 guides towards labels: give labels (and build with class_cond=True)")
        device = next(self.parameters()).device
        x = torch.randn((n, self.in_chans, self.img_size, self.img_size), generator=generator).to(device)
        labels = labels.to(device) if labels is not None else None
        times = torch.linspace(1.0, 0.0, steps + 1, device=device)
        was_training = self.training
        self.eval()
        for k in range(steps):
            t, t_next = times[k], times[k + 1]
            v = self._guided(x, t, labels, cfg)
            if solver == "heun" and t_next > 0:
                v = 0.5 * (v + self._guided(x + (t_next - t) * v, t_next, labels, cfg))
            x = x + (t_next - t) * v
        self.train(was_training)
        return x

    def _guided(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, cfg: float) -> torch.Tensor:
        tb = t.expand(x.shape[0])
        if labels is None or cfg == 1.0:
            return self.velocity(x, tb, labels)
        null = torch.full_like(labels, self.num_classes)
        v_cond, v_null = self.velocity(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([labels, null])).chunk(2)
        return v_null + cfg * (v_cond - v_null)

    def example_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random images and class ids (deterministic for a seeded ``generator``; default seed 0).

        NOTE: the images have std 8, not 1: the flow loss is a random draw (times, noise) whose spread at std 1
        hides what a few SGD steps learn; at high contrast the data term dominates it (the contract test's
        "overfits the example batch" then holds for every seed tried, 50 of 50).
        """
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        size = (batch_size, self.in_chans, self.img_size, self.img_size)
        image = 8.0 * torch.randn(size, generator=g)
        return {"image": image, "label": torch.randint(0, self.num_classes, (batch_size,), generator=g)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, class_cond={self.class_cond}, t_sampling={self.t_sampling!r}"


PIXEL_MEAN, PIXEL_STD = 0.5, 0.5  # RGB views scaled to [-1, 1], the usual flow/diffusion range
FLOW_RANGE = ((PIXEL_MEAN,) * 3, (PIXEL_STD,) * 3)  # as a data set's per-channel (mean, std)


def single_views(sample: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated multi-view batch (``views`` uint8 ``(B, V, 3, H, W)``) -> ``{"image": its first views}``."""
    return {"image": sample["views"][:, 0]}


def _views_adapter(task_kwargs: dict[str, Any]) -> tuple[int, Any, tuple]:
    """``TaskSpec.data_adapter``: ``--dataset render3d`` trains on one view per scene, in [-1, 1] (the range
    MV-Adapter and Modular-Cam feed their frozen base), unconditional (scenes have no class)."""
    return 1, single_views, FLOW_RANGE


register_task(
    TaskSpec(
        name="flow_dit",
        task="generation",
        builder=FlowDiT,
        metric="flow_loss",
        higher_is_better=False,
        kind="C",
        dataset="fashion_mnist",
        num_classes=10,
        in_chans=1,
        img_size=28,
        default_backbone="vit_micro_patch4_28",
        backbones="isotropic",
        backbones_reason="adaLN-Zero conditions every block of one token grid, and the output layer un-patchifies "
        "that grid",
        description="a small DiT trained by flow matching (rectified flow), class-conditional with classifier-free "
        "guidance; Euler/Heun sampling",
        test_backbones=("vit_micro_patch4_28", "vir_nano_patch4_28"),
        test_kwargs={"img_size": 16},
        data_adapter=_views_adapter,
    )
)
