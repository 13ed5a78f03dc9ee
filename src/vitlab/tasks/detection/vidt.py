"""ViDT (Song et al., "ViDT: An Efficient and Effective Fully Transformer-based Object Detector", ICLR 2022,
arXiv:2110.03921, github.com/naver-ai/vidt): a Swin backbone made a detector by [DET] tokens. Task ``"vidt"``.

- **[DET] tokens in Swin**: ``num_det_tokens`` learnable tokens (100 in the paper) join the patch tokens after the
  patch embedding, with a learnable position embedding that every block projects to its width and adds to them.
- **Reconfigured Attention Module (RAM)**: in every block the patch tokens run Swin's own (shifted) window attention,
  unchanged, and the [DET] tokens global self-attention among themselves with the *same* qkv and output
  projections (no relative position bias); in the last stage (``cross_stages``) the [DET] tokens attend to
  [PATCH, DET], the patches' keys and values taken with a sine position encoding. Patch merging reduces only the
  patch tokens; the [DET] tokens go through the same merging layer as if each were a 2x2 patch of itself (the
  code's ``det.repeat(1, 1, 4)``), which gives them the stage's new width. Norms and MLPs are shared.
- **Encoder-free neck**: the stage-2..4 patch maps plus one more patch merging of the last (to the decoder width),
  each projected (1x1 + GroupNorm), are the memory of a deformable DETR decoder (``decoder.py``: 6 layers, FFN 1024,
  4 points, box refinement, auxiliary outputs) whose queries are the last stage's [DET] tokens (projected) with
  their projected position embedding; the [DET] tokens are scored before the first layer too (7 predictions).
  ``neck=False`` is the paper's "RAM only" detector: 3-layer MLP heads on the projected [DET] tokens.
- ``attention="full"``: the YOLOS-style baseline of the paper's ablation. Every block attends globally over all
  [PATCH, DET] tokens (no windows); the patches get the sine position encoding in every block in place of
  Swin's windowed relative position bias, whose tables are then frozen (unused).
- Loss and matching: DETR's Hungarian matching and set loss with sigmoid focal classification (``SetCriterion``:
  class 2, L1 5, GIoU 2), on every prediction. Metrics: COCO mAP (``DetectionMetrics``); primary ``map_50``.

The backbone is a timm ``swin_*`` (vitlab's registered Swins are timm's) or ``swinv2_*`` model by name, adopted
whole: its weights and its checkpoints load unchanged into ``body`` (RAM reuses its parameters and runs its own
window attention for the patches, so they come out exactly as in the plain Swin). ViDT-nano's Swin-nano is
``swin_tiny_patch4_window7_224`` with ``{"embed_dim": 48}``. SwinV2 blocks keep their cosine attention and
post-norm for the [DET] tokens too (an extension; the paper uses Swin and CoaT).

Deviations from the official code: vitlab batches are resized, not padded, so there is no padding mask; the
token projections are linear layers (the code's 1x1 convs on a ``(B, C, Q, 1)`` map, same parameters); without
neck the classifier is sigmoid (focal loss, ``num_classes - 1`` scores, prior-initialised bias) rather than
softmax with a no-object class; the code's never-used modules (patch merging ``expansion``/``norm2``, per-stage
output norms) are not built; the level embedding is added to the decoder memory (see ``decoder.py``); without
neck the last block's patch path, which feeds nothing, is skipped (its position-bias table frozen).
No token-matching distillation, no ViDT+ extensions (EPFF, UQR, IoU-aware and token-labelling losses).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.swin_transformer import PatchMerging, SwinTransformer
from timm.models.swin_transformer_v2 import PatchMerging as PatchMergingV2
from timm.models.swin_transformer_v2 import SwinTransformerV2
from torchvision.ops import box_convert

from ...layers import attend, sincos_2d_normalized
from ...models import Paper
from .._backbone import create_backbone, feature_dicts
from .._registry import register_task
from ..base import TaskModel, TaskSpec
from .criterion import SetCriterion, targets_from_batch
from .decoder import DeformableDecoder, MlpHead, prior_bias

if TYPE_CHECKING:
    from torchmetrics import MetricCollection

__all__ = ["ATTENTIONS", "RamSwin", "ViDT"]

PAPER = Paper(
    31,
    "ViDT: An Efficient and Effective Fully Transformer-based Object Detector",
    "2110.03921",
    "https://github.com/naver-ai/vidt",
    kind="H",
)

ATTENTIONS = ("ram", "full")  # RAM, or YOLOS-style global attention over [PATCH, DET] in every block


def _qkv(attn: nn.Module, x: torch.Tensor, cosine: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Swin attention's q, k, v of tokens ``(B, N, C)`` as ``(B, heads, N, d)``, the logit scale folded into q, so
    ``attend(q, k, v, scale=1.0)`` is that attention's softmax (Swin: ``d ** -0.5``; SwinV2: cosine x its scale)."""
    B, N, _ = x.shape
    if cosine:  # SwinV2: bias (q, 0, v) on a bias-free qkv
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(x, attn.qkv.weight, bias)
    else:
        qkv = attn.qkv(x)
    q, k, v = qkv.view(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    if cosine:
        scale = attn.logit_scale.clamp(max=math.log(100.0)).exp()  # (heads, 1, 1)
        return F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1), v
    return q * attn.scale, k, v


def _global_attention(attn: nn.Module, tokens: torch.Tensor, num_queries: int, cosine: bool) -> torch.Tensor:
    """The last ``num_queries`` of ``tokens`` attend to all of them with ``attn``'s weights -> ``(B, n, C)``."""
    q, k, v = _qkv(attn, tokens, cosine)
    drop = attn.attn_drop.p if attn.training else 0.0
    out = attend(q[:, :, -num_queries:], k, v, dropout_p=drop, scale=1.0)
    return attn.proj_drop(attn.proj(out.transpose(1, 2).flatten(2)))


def _freeze_position_bias(block: nn.Module) -> None:
    # the windowed relative position bias (Swin's table, SwinV2's continuous-bias MLP) when nothing uses it
    bias = getattr(block.attn, "relative_position_bias_table", None)
    for p in [bias] if bias is not None else block.attn.cpb_mlp.parameters():
        p.requires_grad_(False)


class _TokenProj(nn.Module):
    """Linear + GroupNorm over (channels, tokens): the code's 1x1 conv + GroupNorm(32) on a ``(B, C, Q, 1)`` map."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = nn.GroupNorm(math.gcd(32, out_dim), out_dim)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).transpose(1, 2)).transpose(1, 2)


class RamSwin(nn.Module):
    """A timm Swin / SwinV2 (by name, adopted whole as ``body``) run with [DET] tokens through RAM.

    ``forward(image)`` -> ``(maps, det, det_pos)``: the patch maps ``(B, C_s, H_s, W_s)`` of stages 1.. (plus, with
    ``extra_dim``, one more patch merging of the last stage's map to ``extra_dim`` channels), the last stage's [DET]
    tokens ``(B, Q, C_last)`` and their position embedding ``(1, Q, pos_dim)``.

    Args:
        num_det_tokens: the [DET] tokens (queries).
        pos_dim: width of the [DET] position embedding (the decoder width in ViDT).
        attention: "ram", or "full" (YOLOS-style global attention over every token in every block).
        cross_stages: stages where [DET] attends to [PATCH, DET] under RAM (the last one in the paper).
        extra_dim: width of the extra merged level (the neck's fourth level); None: no extra level.
        patch_output: whether the last block's patch tokens are used (False without neck: they are skipped).
    """

    def __init__(
        self,
        backbone: str,
        *,
        in_chans: int,
        img_size: int,
        num_det_tokens: int = 100,
        pos_dim: int = 256,
        attention: str = "ram",
        cross_stages: Sequence[int] = (-1,),
        extra_dim: int | None = None,
        patch_output: bool = True,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if not isinstance(num_det_tokens, int) or num_det_tokens < 1:
            raise ValueError(f"num_det_tokens must be a positive integer, got {num_det_tokens!r}")
        body = create_backbone(backbone, in_chans=in_chans, img_size=img_size, **(backbone_kwargs or {}))
        if len({d["reduction"] for d in feature_dicts(body)}) == 1:
            raise ValueError(
                f"backbone {backbone!r} is isotropic; ViDT needs a hierarchical Swin (its RAM runs inside Swin's "
                "window attention): a timm swin_* or swinv2_* model"
            )
        if not isinstance(body, (SwinTransformer, SwinTransformerV2)):
            raise ValueError(
                f"backbone {backbone!r} ({type(body).__name__}) is not a Swin; ViDT's RAM runs inside Swin's window "
                "attention: use a timm swin_* or swinv2_* model"
            )
        body.prune_intermediate_layers(len(body.layers), prune_norm=True, prune_head=True)
        self.body = body
        self.cosine = isinstance(body, SwinTransformerV2)  # SwinV2: cosine attention, norms after attention / MLP
        self.attention = attention
        dims = [int(d["num_chs"]) for d in feature_dicts(body)]
        S = len(dims)
        if any(not -S <= s < S for s in cross_stages):
            raise ValueError(f"cross_stages {tuple(cross_stages)} must index the backbone's {S} stages")
        self.cross_stages = sorted({s % S for s in cross_stages})
        self.det_token = nn.Parameter(trunc_normal_(torch.zeros(1, num_det_tokens, dims[0]), std=0.02))
        self.det_pos_embed = nn.Parameter(trunc_normal_(torch.zeros(1, num_det_tokens, pos_dim), std=0.02))
        self.det_pos_proj = nn.ModuleList(
            nn.ModuleList(nn.Linear(pos_dim, dim) for _ in stage.blocks)
            for dim, stage in zip(dims, body.layers, strict=True)
        )
        self.extra_merge = None
        if extra_dim is not None:
            self.extra_merge = (PatchMergingV2 if self.cosine else PatchMerging)(dims[-1], out_dim=extra_dim)
            trunc_normal_(self.extra_merge.reduction.weight, std=0.02)
        self.patch_output = patch_output
        self.det_dim = dims[-1]
        self.out_channels = dims[1:] + ([extra_dim] if extra_dim is not None else [])
        blocks = [b for stage in body.layers for b in stage.blocks]
        for block in blocks if attention == "full" else blocks[-1:] if not patch_output else ():
            _freeze_position_bias(block)

    def _merge_det(self, downsample: nn.Module, det: torch.Tensor) -> torch.Tensor:
        """[DET] tokens through a patch merging, each as a 2x2 patch of itself (all four inputs the same token)."""
        if isinstance(downsample, nn.Identity):
            return det
        B, Q, C = det.shape
        return downsample(det[:, None, :, None].expand(B, 2, Q, 2, C).reshape(B, 2, 2 * Q, C)).reshape(B, Q, -1)

    def _block(
        self, block: nn.Module, x: torch.Tensor, det: torch.Tensor, det_pos: torch.Tensor,
        patch_pos: torch.Tensor | None, patch_out: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """One Swin block on patches ``x (B, H, W, C)`` and ``det (B, Q, C)`` under RAM or full attention."""
        B, H, W, C = x.shape
        N, Q, pre = H * W, det.shape[1], not self.cosine
        h = block.norm1(x) if pre else x
        d = (block.norm1(det) if pre else det) + det_pos
        if self.attention == "full":
            out = _global_attention(block.attn, torch.cat([h.reshape(B, N, C) + patch_pos, d], 1), N + Q, self.cosine)
            a_patch, a_det = out[:, :N].reshape(B, H, W, C), out[:, N:]
        else:
            a_patch = block._attn(h) if patch_out else None  # Swin's own (shifted) window attention
            tokens = d if patch_pos is None else torch.cat([h.reshape(B, N, C) + patch_pos, d], 1)
            a_det = _global_attention(block.attn, tokens, Q, self.cosine)
        if not pre:
            a_det = block.norm1(a_det)
            a_patch = block.norm1(a_patch) if a_patch is not None else None
        det = det + block.drop_path1(a_det)
        t = det if a_patch is None else torch.cat([(x + block.drop_path1(a_patch)).reshape(B, N, C), det], 1)
        t = t + block.drop_path2(block.mlp(block.norm2(t)) if pre else block.norm2(block.mlp(t)))
        return (x, t) if a_patch is None else (t[:, :N].reshape(B, H, W, C), t[:, N:])

    def forward(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        x = self.body.patch_embed(image)  # (B, H, W, C)
        det = self.det_token.repeat(x.shape[0], 1, 1)  # a copy: a no-grad view of a parameter trips FLOP counting
        maps, last = [], len(self.body.layers) - 1
        for s, (stage, projs) in enumerate(zip(self.body.layers, self.det_pos_proj, strict=True)):
            x = stage.downsample(x)
            det = self._merge_det(stage.downsample, det)
            patch_pos = None
            if self.attention == "full" or s in self.cross_stages:
                H, W, C = x.shape[1:]
                patch_pos = sincos_2d_normalized((H, W), C, device=x.device).to(x.dtype).reshape(1, H * W, C)
            for j, (block, proj) in enumerate(zip(stage.blocks, projs, strict=True)):
                patch_out = self.patch_output or s < last or j < len(stage.blocks) - 1
                x, det = self._block(block, x, det, proj(self.det_pos_embed), patch_pos, patch_out)
            if s > 0:
                maps.append(x.permute(0, 3, 1, 2))
        if self.extra_merge is not None:
            maps.append(self.extra_merge(x).permute(0, 3, 1, 2))
        return maps, det, self.det_pos_embed


class ViDT(TaskModel):
    """Swin with [DET] tokens and RAM + encoder-free deformable neck: image -> DETR outputs (see the module doc).

    ``forward`` returns ``{"pred_logits": (B, Q, num_classes - 1), "pred_boxes": (B, Q, 4) normalised cxcywh,
    "aux_outputs": [...]}`` (no ``aux_outputs`` without neck).

    Args:
        num_classes: the scene classes, background included (``num_classes - 1`` sigmoid scores).
        num_det_tokens: [DET] tokens, the most objects an image may hold (100 in the paper).
        dim: the decoder's (and the heads') width, also the [DET] position embedding's (256 in the paper).
        neck: the encoder-free deformable decoder; False: MLP heads on the [DET] tokens ("RAM only").
        attention: "ram" (ViDT) or "full" (YOLOS-style global attention).
        decoder_layers, decoder_heads, decoder_points, ffn_dim, dropout: the decoder (6, 8, 4, 1024, 0.1).
        box_refine: iterative box refinement in the decoder (the paper's setting).
    """

    task_name = "vidt"
    target_keys = ("boxes", "labels")
    primary_metric = "map_50"
    higher_is_better = True

    def __init__(
        self,
        backbone: str = "swin_tiny_patch4_window7_224",
        *,
        num_classes: int = 11,
        in_chans: int = 1,
        img_size: int = 64,
        backbone_kwargs: dict[str, Any] | None = None,
        num_det_tokens: int = 100,
        dim: int = 256,
        neck: bool = True,
        attention: str = "ram",
        decoder_layers: int = 6,
        decoder_heads: int = 8,
        decoder_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        box_refine: bool = True,
    ) -> None:
        super().__init__(backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        if num_classes < 2:
            raise ValueError(f"num_classes must count the background and at least one class (>= 2), got {num_classes}")
        self.num_things = num_classes - 1
        self.num_det_tokens = num_det_tokens
        self.body = RamSwin(
            backbone, in_chans=in_chans, img_size=img_size, num_det_tokens=num_det_tokens, pos_dim=dim,
            attention=attention, extra_dim=dim if neck else None, patch_output=neck, backbone_kwargs=backbone_kwargs,
        )  # fmt: skip
        det_dim = self.body.det_dim
        self.decoder = self.head = None
        if neck:
            self.input_proj = nn.ModuleList(
                nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(math.gcd(32, dim), dim))
                for c in self.body.out_channels
            )
            for proj in self.input_proj:
                nn.init.xavier_uniform_(proj[0].weight)
                nn.init.zeros_(proj[0].bias)
            self.tgt_proj = _TokenProj(det_dim, dim)
            self.query_pos_proj = _TokenProj(dim, dim)
            self.decoder = DeformableDecoder(
                dim, self.num_things, decoder_layers, decoder_heads, len(self.body.out_channels), decoder_points,
                ffn_dim, dropout, box_refine=box_refine, score_queries=True,
            )  # fmt: skip
        else:
            self.det_proj = _TokenProj(det_dim, dim)
            self.class_head = MlpHead(dim, dim, self.num_things, 3)
            self.box_head = MlpHead(dim, dim, 4, 3)
            nn.init.constant_(self.class_head.layers[-1].bias, prior_bias())
        self.criterion = SetCriterion(self.num_things)

    def forward_image(self, image: torch.Tensor) -> dict[str, Any]:
        """``(B, C, H, W)`` -> the DETR output dict."""
        maps, det, det_pos = self.body(image)
        if self.decoder is None:
            x = self.det_proj(det)
            return {"pred_logits": self.class_head(x), "pred_boxes": self.box_head(x).sigmoid()}
        memory = [proj(m) for proj, m in zip(self.input_proj, maps, strict=True)]
        return self.decoder(self.tgt_proj(det), self.query_pos_proj(det_pos), memory)

    def _targets(self, batch: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
        image = batch.get("image")
        size = (int(image.shape[-2]), int(image.shape[-1])) if torch.is_tensor(image) else self.img_size
        return targets_from_batch(batch, size, self.num_things)

    def loss(self, output: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The set loss of every prediction (``SetCriterion``); images without objects train the 'no object' side."""
        return self.criterion(output, self._targets(batch))

    def build_metrics(self) -> MetricCollection:
        from torchmetrics import MetricCollection

        from .metrics import DetectionMetrics

        return MetricCollection({"detection": DetectionMetrics()})

    def update_metrics(self, metrics: MetricCollection, output: Mapping[str, Any], batch: Mapping[str, Any]) -> None:
        from .metrics import postprocess_detections

        H, W = batch["image"].shape[-2:]
        device = next(iter(metrics.values())).device
        scale = torch.tensor([W, H, W, H], dtype=torch.float32)
        targets = [  # back to pixel xyxy, now checked and clipped to the image
            {
                "boxes": (box_convert(t["boxes"].float().cpu(), "cxcywh", "xyxy") * scale).to(device),
                "labels": t["labels"].to(device),
            }
            for t in self._targets(batch)
        ]
        preds = postprocess_detections(output["pred_logits"], output["pred_boxes"], (int(H), int(W)))
        metrics["detection"].update([{k: v.to(device) for k, v in p.items()} for p in preds], targets)

    def summarize_metrics(self, metrics: MetricCollection) -> dict[str, float | list]:
        """COCO ``map``, ``map_50``, ``map_75``, by size, and ``mar_*`` in percent (None where COCO has no value;
        ``map_50`` is 0.0 when the evaluation held no box at all)."""
        values = metrics["detection"].compute()
        summary = {k: v for k, v in values.items() if not k.endswith("_per_class") and k != "classes"}
        summary[self.primary_metric] = summary.get(self.primary_metric) or 0.0
        return summary

    def postprocess(self, output: Mapping[str, Any]) -> dict[str, list[torch.Tensor]]:
        """Per image the top 100 ``"boxes"`` (k, 4) pixel xyxy, ``"labels"`` (k,) int64 and ``"scores"`` (k,)."""
        from .metrics import postprocess_detections

        dets = postprocess_detections(output["pred_logits"], output["pred_boxes"], self.img_size)
        return {key: [d[key] for d in dets] for key in ("boxes", "labels", "scores")}

    def example_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Up to 3 rectangles of random classes per image (the last image empty) on a background, with boxes."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        size, K, C = self.img_size, self.num_things, self.in_chans
        palette = torch.randn(K + 1, C, 1, 1, generator=g)  # the last colour is the background
        image = palette[K].expand(batch_size, C, size, size).clone()
        boxes, labels = [], []
        for b in range(batch_size):
            empty = batch_size > 1 and b == batch_size - 1
            n = 0 if empty else min(int(torch.randint(1, 4, (1,), generator=g)), self.num_det_tokens)
            box, label = torch.zeros(n, 4), torch.randint(0, K, (n,), generator=g)
            for i in range(n):
                h, w = (int(v) for v in torch.randint(max(size // 4, 1), max(size // 2, 2), (2,), generator=g))
                y, x = (int(v) for v in torch.randint(0, size - max(h, w) + 1, (2,), generator=g))
                image[b, :, y : y + h, x : x + w] = palette[label[i]]
                box[i] = torch.tensor([x, y, x + w, y + h], dtype=torch.float32)
            boxes.append(box)
            labels.append(label)
        image = image + 0.1 * torch.randn(image.shape, generator=g)
        return {"image": image, "boxes": boxes, "labels": labels}


register_task(
    TaskSpec(
        name="vidt",
        task="detection",
        builder=ViDT,
        metric="map_50",
        paper=PAPER,
        ref_metric=59.9,
        ref_source="ViDT (Swin-nano), COCO val2017 AP50 (AP 40.4), 50 epochs (official README); 15 M parameters",
        ref_params_m=15.0,
        default_backbone="swin_tiny_patch4_window7_224",
        description="Swin with [DET] tokens and the reconfigured attention module + encoder-free deformable decoder",
        test_backbones=("swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"),
        test_kwargs={"img_size": 32, "num_det_tokens": 8, "dim": 32, "decoder_layers": 2, "decoder_heads": 2},
        backbones="hierarchical",
        backbones_reason="RAM runs inside Swin's window attention: ViDT takes timm Swin / SwinV2 backbones by name",
    )
)
