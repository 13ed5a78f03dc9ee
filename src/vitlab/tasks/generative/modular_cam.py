"""``modular_cam``: Modular-Cam's video generator at small scale: a frozen image FlowDiT, motion modules, one LoRA
per camera motion, and a conditioning branch that joins scenes.

Modular-Cam: Modular Dynamic Camera-view Video Generation with LLM (Pan et al., AAAI 2025, arXiv:2504.12048,
github.com/pzrain/Modular-Cam). The paper's system: an LLM-Director splits a prompt into scenes and picks a camera
motion per scene; a video generator (Stable Diffusion + AnimateDiff motion modules) makes each scene with the
camera-motion module of that scene (CamOperator; in the released code AnimateDiff Motion-LoRAs); AdaControlNet (a
SparseCtrl ControlNet) conditions each scene on the previous scene's last frame, for cross-scene consistency.

Implemented here (parts in ``modular_cam_parts.py``): the base generator is a ``flow_dit`` (DiT trained by flow
matching on single frames, loaded frozen from ``base_checkpoint``); a zero-initialised ``MotionModule`` after every
DiT block (temporal self-attention per token position, sinusoidal frame positions); ``motions`` LoRAs on the motion
modules' attention (``layers.adapters.add_lora``, picked with ``active_motion`` or ``sample(motion=)``); with
``control=True`` a ``ControlBranch``: a trainable zero-init copy of the first ``control_depth`` blocks reading the
noisy frames plus the condition frame at frame 0 (with a mask channel), adding residuals to those blocks; the
director is ``modular_cam_parts.direct`` (rule-based). The objective is the base's flow matching on whole clips (one
time per clip, independent noise per frame); ``train`` says which part trains ("motion", "lora", "control", or
"all" for a model without a base checkpoint, e.g. the contract test). With ``control=True`` a clip's own first
frame is the condition while training (SparseCtrl's keyframe conditioning), unless the batch gives ``cond``.

Deviations: a DiT on 16-32 px gray frames, not a latent UNet; the LLM is replaced by a keyword parser (say so in
every table); the ControlNet copy is per frame (no temporal layers in the branch); no classifier-free guidance on
clips (the base's labels condition every frame; ``cfg`` is 1). The paper describes CamOperator as plug-in camera
motion modules; the released code realises them as AnimateDiff Motion-LoRAs, which is what is built here. The
released code downloads pretrained motion modules and Motion-LoRAs and trains only AdaControlNet; here every part is
trained at small scale on ``camera_motion_videos`` (``benchmarks/modular_cam.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...layers.adapters import AdapterError, add_lora, freeze, lora_names, set_lora, zero_init_copy
from ...layers.dit import unpatchify
from ...models import Paper
from .._registry import register_task
from ..base import TaskSpec
from ..video.base import VideoTaskModel
from .flow import FlowDiT, FlowMetrics, grid_picture
from .modular_cam_parts import LORA_TARGETS, ControlBranch, MotionModule, Scene, direct
from .mv_adapter_parts import FlowBaseReload, build_flow_base

if TYPE_CHECKING:
    pass

__all__ = ["PAPER", "ModularCam"]

PAPER = Paper(43, "Modular-Cam: Modular Dynamic Camera-view Video Generation with LLM", "2504.12048",
              "https://github.com/pzrain/Modular-Cam", kind="C")  # fmt: skip
TRAIN_PARTS = ("motion", "lora", "control", "all")
EVAL_TIMES = 8


class ModularCam(FlowBaseReload, FlowMetrics, VideoTaskModel):
    """Clips ``(B, T, C, H, W)`` (+ ``label`` ids, + optional ``cond`` frames) -> velocity, target and times.

    Args:
        base_checkpoint: a ``flow_dit`` checkpoint; None builds a random base of ``backbone`` (tests, ``train="all"``).
            base_config: the base's architecture instead (a reloading run writes it; its weights come from the run).
        motions: the camera-motion LoRAs to create (names, e.g. ``["pan_left", "zoom_in"]``); ``lora_rank`` their rank.
        active_motion: the LoRA active in ``forward`` (None: the motion module alone).
        control: add the conditioning branch (copies of the first ``control_depth`` blocks).
        train: which part receives gradients ("motion", "lora": the active LoRA, "control", "all").
        motion_layers, motion_heads, max_frames: the motion modules' attention layers, heads and frame positions.
    """

    task_name = "modular_cam"
    batch_keys = ("image",)

    def __init__(
        self,
        backbone: str = "vit_micro_patch4_28",
        *,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 16,
        num_frames: int = 8,
        backbone_kwargs: dict[str, Any] | None = None,
        base_checkpoint: str | None = None,
        base_config: dict[str, Any] | None = None,
        motions: Sequence[str] = (),
        lora_rank: int = 4,
        active_motion: str | None = None,
        control: bool = False,
        control_depth: int = 1,
        train: str = "motion",
        motion_layers: int = 2,
        motion_heads: int = 4,
        max_frames: int = 32,
        eval_seed: int = 2024,
    ) -> None:
        super().__init__(backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size, num_frames=num_frames)
        if train not in TRAIN_PARTS:  # checked before the base is loaded
            raise ValueError(f"train must be one of {TRAIN_PARTS}, got {train!r}")
        self.base_config = None
        if base_checkpoint is not None or base_config is not None:
            self.base, self.base_config = build_flow_base(base_checkpoint, base_config)
            if (self.base.in_chans, self.base.img_size) != (in_chans, img_size):
                raise ValueError(f"base_checkpoint makes {self.base.in_chans}-channel {self.base.img_size} px frames; "
                                 f"asked for in_chans={in_chans}, img_size={img_size}")  # fmt: skip
        else:
            self.base = FlowDiT(backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                                backbone_kwargs=backbone_kwargs)  # fmt: skip
        dim = self.base.trunk.embed_dim
        blocks = self.base.blocks
        self.motion = nn.ModuleList(MotionModule(dim, motion_heads, motion_layers, max_frames) for _ in blocks)
        self.motions = list(motions)
        for name in self.motions:
            add_lora(self.motion, list(LORA_TARGETS), rank=lora_rank, name=name)
        if active_motion is not None and active_motion not in self.motions:
            raise AdapterError(f"active_motion {active_motion!r} is not one of the LoRAs {self.motions}")
        self.active_motion = active_motion
        if self.motions:
            set_lora(self.motion, active_motion)
        self.control = None
        if control:
            if not 1 <= control_depth <= len(blocks):
                raise ValueError(
                    f"control_depth must be in [1, {len(blocks)}] (the base's blocks), got {control_depth}"
                )
            branch = ControlBranch(list(blocks[:control_depth]), dim, self.base.trunk.patch_size, in_chans)
            self.control = zero_init_copy(branch, ["hint", "outs"])
        self.eval_seed = eval_seed
        self.set_train(train)

    def set_train(self, part: str) -> None:
        """Make ``part`` the trained part ("motion", "lora": the active LoRA, "control", "all"); freeze the rest."""
        if part not in TRAIN_PARTS:
            raise ValueError(f"train must be one of {TRAIN_PARTS}, got {part!r}")
        if part == "lora" and self.active_motion is None:
            raise ValueError("train='lora' trains the active LoRA: give active_motion (one of motions)")
        if part == "control" and self.control is None:
            raise ValueError("train='control' needs control=True")
        self.train_part = part
        self._set_trainable()

    def _set_trainable(self) -> None:
        """Freeze all but the part named by ``train`` (LoRA: only the active adapter's weights)."""
        if self.train_part == "all":
            for p in self.parameters():
                p.requires_grad_(True)
            inactive = [n for n in self.motions if n != self.active_motion]
            for name, p in self.named_parameters():
                if any(f".{n}." in name for n in inactive):
                    p.requires_grad_(False)
            return
        keep = {"motion": [self.motion], "control": [self.control]}.get(self.train_part, [])
        freeze(self, keep=keep)
        if self.train_part == "lora":
            for name, p in self.motion.named_parameters():
                p.requires_grad_(f".{self.active_motion}." in name and "lora_" in name)
        elif self.train_part == "motion":  # the LoRAs stay out of the motion module's own training
            for name, p in self.motion.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(False)

    def use_motion(self, motion: str | None) -> None:
        """Switch the active camera-motion LoRA (None: the motion module alone); unknown names raise AdapterError."""
        if motion is not None and motion not in self.motions:
            raise AdapterError(f"unknown camera motion LoRA {motion!r}; this model has {self.motions}")
        self.active_motion = motion
        if self.motions:
            set_lora(self.motion, motion)
            self._set_trainable()  # peft re-opens the active adapter's weights; keep the ``train`` policy

    # -- the velocity network on clips --------------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None,
                 cond: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """``v`` for clips ``x`` (B, T, C, H, W) at times ``t`` (B,); ``cond`` (B, C, H, W): frame 0's condition."""
        B, T = x.shape[:2]
        base = self.base
        tokens, grid = base.trunk.embed(x.flatten(0, 1))
        c = base.condition(t, label).repeat_interleave(T, 0)
        residuals: list[torch.Tensor] = []
        if self.control is not None and cond is not None:
            mask = torch.zeros(B, T, 1, *x.shape[-2:], device=x.device, dtype=x.dtype)
            mask[:, 0] = 1.0  # the previous scene's last frame stands at this scene's frame 0
            hint = torch.cat([cond[:, None] * mask, mask], 2).flatten(0, 1)
            residuals = self.control(tokens, c, grid, hint)
        for i, (block, motion) in enumerate(zip(base.blocks, self.motion, strict=True)):
            tokens = block(tokens, c, grid)
            if i < len(residuals):
                tokens = tokens + residuals[i]
            tokens = motion(tokens, T)
        out = base.final(tokens[:, base.trunk.num_prefix_tokens :], c)
        return unpatchify(out, grid, base.trunk.patch_size, self.in_chans).unflatten(0, (B, T))

    def forward(self, batch_or_image: torch.Tensor | Mapping[str, Any], label: torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """Normalised clips (or a batch dict with ``image``, ``identity``/``label`` and ``cond``) -> flow output."""
        image = batch_or_image
        if isinstance(image, Mapping):
            label, cond = image.get("identity", image.get("label", label)), image.get("cond", cond)
            if "image" not in image:
                raise ValueError(f"batch has no 'image' (keys: {sorted(image)})")
            image = image["image"]
        self.check_image(image)
        label = self.base.check_labels(label, image.shape[0])
        if cond is not None and (not isinstance(cond, torch.Tensor) or cond.shape != image[:, 0].shape):
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"cond must be one frame per clip {tuple(image[:, 0].shape)}, got {got}")
        return self.forward_image(image, label, cond)

    def forward_kwargs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        kw = {"label": batch.get("identity", batch.get("label"))}
        return {**kw, "cond": batch["cond"]} if "cond" in batch else kw

    def forward_image(self, image: torch.Tensor, label: torch.Tensor | None = None,
                      cond: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        B = image.shape[0]
        if self.control is not None and cond is None:
            cond = image[:, 0]  # keyframe conditioning on the clip's own first frame (module docstring)
        if self.training:
            t, noise = torch.sigmoid(torch.randn(B, device=image.device)), torch.randn_like(image)
        else:  # fixed times and noise: a deterministic held-out loss
            noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(self.eval_seed)).to(image)
            t = ((torch.arange(B, device=image.device) % EVAL_TIMES + 0.5) / EVAL_TIMES).to(image.dtype)
        tb = t.view(B, 1, 1, 1, 1)
        x_t = (1 - tb) * image + tb * noise
        return {"velocity": self.velocity(x_t, t, label, cond), "target": noise - image, "t": t}

    def loss(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {"loss": F.mse_loss(output["velocity"], output["target"])}

    # -- sampling -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, motion: str | None = None,
               cond: torch.Tensor | None = None, steps: int = 20,
               generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        """``n`` clips ``(n, T, C, H, W)`` (normalised) by Euler steps from noise, with the LoRA ``motion`` active.

        ``cond`` ``(n, C, H, W)``: the frame each clip's frame 0 is conditioned on (needs ``control=True``).
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if cond is not None and self.control is None:
            raise ValueError("cond needs the conditioning branch: build with control=True")
        labels = self.base.check_labels(labels, n)
        before = self.active_motion
        self.use_motion(motion)
        device = next(self.parameters()).device
        shape = (n, self.num_frames, self.in_chans, self.img_size, self.img_size)
        x = torch.randn(shape, generator=generator).to(device)
        times = torch.linspace(1.0, 0.0, steps + 1, device=device)
        was_training = self.training
        self.eval()
        try:
            for k in range(steps):
                x = x + (times[k + 1] - times[k]) * self.velocity(x, times[k].expand(n), labels, cond)
        finally:
            self.train(was_training)
            self.use_motion(before)
        return x

    def generate(self, script: str, classes: Sequence[str], n: int = 1, steps: int = 20, chain: bool = True,
                 generator: torch.Generator | None = None) -> tuple[list[Scene], list[torch.Tensor]]:  # fmt: skip
        """Director + generator: ``script`` -> scenes -> one clip batch ``(n, T, C, H, W)`` per scene; with
        ``chain`` (and the conditioning branch) each scene is conditioned on the previous scene's last frame."""
        scenes = direct(script, classes, [*self.motions, "static"])
        clips: list[torch.Tensor] = []
        for scene in scenes:
            labels = None if scene.label is None else torch.full((n,), scene.label, dtype=torch.long)
            cond = clips[-1][:, -1] if chain and clips and self.control is not None else None
            motion = None if scene.motion == "static" else scene.motion
            clips.append(self.sample(n, labels, motion, cond, steps, generator))
        return scenes, clips

    @torch.inference_mode()
    def draw_samples(self, mean: Sequence[float], std: Sequence[float], per_row: int = 2, seed: int = 0) -> Any:
        """``vitlab predict``: ``per_row`` generated clips (frames across) without a LoRA, then with each camera-motion
        LoRA, a row each, de-normalised with the data set's ``mean``/``std``; deterministic for ``seed``."""
        rows = [self.sample(per_row, motion=m, generator=torch.Generator().manual_seed(seed)).cpu()
                for m in [None, *self.motions]]  # fmt: skip
        clips = torch.cat(rows)  # (rows * per_row, T, C, H, W)
        m, s = (torch.tensor(v, dtype=clips.dtype).view(1, 1, -1, 1, 1)[:, :, : clips.shape[2]] for v in (mean, std))
        frames = (clips * s + m).clamp(0, 1).flatten(0, 1)
        return grid_picture(frames, nrow=clips.shape[1])

    def example_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random clips (std 8, as ``flow_dit``'s example: the data term dominates the random flow loss) and ids."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        clips = 8.0 * self.example_clips(batch_size, g)
        return {"image": clips, "identity": torch.randint(0, self.num_classes, (batch_size,), generator=g)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, motions={self.motions}, control={self.control is not None}"

    def lora_names(self) -> list[str]:
        return lora_names(self.motion) if self.motions else []


register_task(
    TaskSpec(
        name="modular_cam",
        task="video_generation",
        builder=ModularCam,
        metric="flow_loss",
        higher_is_better=False,
        paper=PAPER,
        kind="C",
        dataset="camera_motion_videos",
        num_classes=10,
        in_chans=1,
        img_size=16,
        default_backbone="vit_micro_patch4_28",
        backbones="isotropic",
        backbones_reason="the base is a flow_dit (adaLN-Zero DiT on one token grid), and the motion modules attend "
        "over each token position of that grid",
        description="Modular-Cam at small scale: frozen FlowDiT frames + zero-init temporal motion modules, one LoRA "
        "per camera motion, a ControlNet-style branch on the previous scene's last frame, a rule-based director",
        test_backbones=("vit_micro_patch4_28", "vir_nano_patch4_28"),
        test_kwargs={
            "img_size": 16,
            "num_frames": 3,
            "motions": ["pan_left"],
            "active_motion": "pan_left",
            "control": True,
            "train": "all",
            "motion_layers": 1,
            "motion_heads": 2,
        },
    )
)
