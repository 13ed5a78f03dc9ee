"""LeTFuser's parts: GradNorm task weighting, the semantic depth cloud (SDC) top-down grid, the GRU waypoint decoder.

``GradNorm`` follows Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask
Networks" (arXiv:1711.02257), Eq. 1-2: learnable task weights ``w_i`` (renormalised to sum to the task count),
``G_i = ||grad_W w_i L_i||`` on a shared layer ``W``, relative inverse training rates ``r_i = L~_i / mean(L~)`` with
``L~_i = L_i(t) / L_i(0)``, and the weights' own loss ``sum_i |G_i - mean(G) r_i^alpha|`` with the target held
constant. The network is trained on ``sum_i w_i L_i`` with the weights held constant; one backward of
:meth:`GradNorm.forward`'s total does both, because ``||grad_W L_i||`` is computed apart and enters as a constant.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...layers.camera import pixel_grid, transform_points, unproject

__all__ = ["GRUWaypointDecoder", "GradNorm", "SemanticDepthCloud"]


class GradNorm(nn.Module):
    """Task weights trained by GradNorm (asymmetry ``alpha``; the paper and LeTFuser's ``lw_alpha``: 1.5)."""

    def __init__(self, num_tasks: int, alpha: float = 1.5) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.alpha = alpha
        self.weights = nn.Parameter(torch.ones(num_tasks))
        self.register_buffer("initial", torch.zeros(num_tasks))  # L_i(0), set on the first training call

    def forward(self, losses: torch.Tensor, shared: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Task losses (T,) and the shared layer's weight -> (total loss, logs). Outside training (or without
        gradients) the total is ``sum w_i L_i`` and nothing is updated."""
        T = len(self.weights)
        if losses.shape != (T,):
            raise ValueError(f"losses must be ({T},) task losses, got {tuple(losses.shape)}")
        with torch.no_grad():  # the paper renormalises after every step; before use is the same
            self.weights.clamp_(min=1e-3).mul_(T / self.weights.sum())
        w = self.weights
        logs = {f"weight_{i}": w[i].detach() for i in range(T)}
        if not (self.training and torch.is_grad_enabled() and losses.requires_grad):
            return (w.detach() * losses).sum(), logs
        if not bool(self.initial.any()):
            self.initial.copy_(losses.detach())
        norms = []
        for i in range(T):
            (g,) = torch.autograd.grad(losses[i], shared, retain_graph=True, allow_unused=True)
            norms.append(torch.zeros((), device=losses.device) if g is None else g.norm())
        G = w * torch.stack(norms).detach()  # ||grad_W w_i L_i|| = w_i ||grad_W L_i||
        ratio = losses.detach() / self.initial.clamp(min=1e-12)
        target = (G.mean() * (ratio / ratio.mean()) ** self.alpha).detach()
        grad_loss = (G - target).abs().sum()
        return (w.detach() * losses).sum() + grad_loss, {**logs, "gradnorm_loss": grad_loss.detach()}


class SemanticDepthCloud(nn.Module):
    """Per-pixel class probabilities and z-depth of every camera, unprojected with its ``K`` and ``cam_to_ego`` into
    a ``grid`` x ``grid`` top-down grid (x ahead in [0, ``extent``), y in [-extent/2, extent/2)); each cell holds the
    mean class probabilities of its points and log(1 + count), encoded by a small CNN to ``out_dim``."""

    def __init__(self, num_classes: int, grid: int = 16, extent: float = 24.0, max_height: float = 3.5,
                 out_dim: int = 64) -> None:  # fmt: skip
        super().__init__()
        self.grid, self.extent, self.max_height = grid, extent, max_height
        self.encoder = nn.Sequential(
            nn.Conv2d(num_classes + 1, 32, 3, 2, 1), nn.GELU(), nn.Conv2d(32, out_dim, 3, 2, 1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.out_dim = out_dim

    def splat(
        self, probs: torch.Tensor, depth: torch.Tensor, K: torch.Tensor, cam_to_ego: torch.Tensor
    ) -> torch.Tensor:
        """Probabilities (B, V, C, H, W), depth (B, V, H, W), K (B, V, 3, 3), cam_to_ego (B, V, 4, 4) -> the grid
        (B, C + 1, grid, grid) (rows: x ahead, far first; columns: y, left first)."""
        B, _, C, H, W = probs.shape
        at = (slice(None), slice(None), None, None)
        cam, ok = unproject(pixel_grid(H, W, depth.dtype, depth.device), K[at], depth=depth.detach())
        ego = transform_points(cam_to_ego[at], cam)  # (B, V, H, W, 3)
        G, cell = self.grid, self.extent / self.grid
        row = G - 1 - torch.floor(ego[..., 0] / cell)
        col = torch.floor((self.extent / 2 - ego[..., 1]) / cell)
        keep = ok & (depth > 0) & (row >= 0) & (row < G) & (col >= 0) & (col < G) & (ego[..., 2] < self.max_height)
        index = torch.where(keep, row * G + col, torch.zeros_like(row)).long().flatten(1)  # (B, V*H*W)
        src = (probs.movedim(2, -1) * keep[..., None]).reshape(B, -1, C)
        sums = probs.new_zeros(B, G * G, C).scatter_add(1, index[..., None].expand(-1, -1, C), src)
        count = probs.new_zeros(B, G * G).scatter_add(1, index, keep.flatten(1).to(probs.dtype))
        mean = sums / count.clamp(min=1)[..., None]
        return torch.cat([mean, torch.log1p(count)[..., None]], -1).transpose(1, 2).reshape(B, C + 1, G, G)

    def forward(self, probs: torch.Tensor, depth: torch.Tensor, K: torch.Tensor, cam_to_ego: torch.Tensor):
        return self.encoder(self.splat(probs, depth, K, cam_to_ego))


class GRUWaypointDecoder(nn.Module):
    """TransFuser/LeTFuser's autoregressive decoder: a GRU cell from the fused feature, input (current waypoint,
    route target, light probabilities), each step predicting an offset added to the previous waypoint."""

    def __init__(self, hidden: int, num_waypoints: int, extra: int = 4) -> None:
        super().__init__()
        self.num_waypoints = num_waypoints
        self.cell = nn.GRUCell(2 + extra, hidden)
        self.out = nn.Linear(hidden, 2)

    def forward(self, h: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        """Fused features (B, hidden) and the extra inputs (B, extra) -> waypoints (B, K, 2), ego frame (m)."""
        x = h.new_zeros(h.shape[0], 2)
        out = []
        for _ in range(self.num_waypoints):
            h = self.cell(torch.cat([x, extra], -1), h)
            x = x + self.out(h)
            out.append(x)
        return torch.stack(out, 1)


def seg_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, V, C, H, W) logits against (B, V, H, W) class ids."""
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1))
