"""Global alignment of pairwise pointmaps into one world (paper 37, the review "DUSt3R -> VGGT", arXiv 2507.08448;
DUSt3R, Wang et al., CVPR 2024, Sec. 3.4). Reconstructed from the paper's equations; no code copied.

A pair model (:class:`.dust3r.Dust3R`) run on the directed edge ``e = (n, m)`` gives the pointmaps ``X^{n,e}``,
``X^{m,e}`` of views n and m, both in view n's camera frame, and confidences ``C^{n,e}``, ``C^{m,e}``. Global
alignment looks for world pointmaps ``chi^v`` of every view and, per edge, a scale ``sigma_e`` and a rigid pose
``P_e = (R_e, t_e)`` minimising

    L = sum_e sum_{v in e} sum_i C_i^{v,e} | chi_i^v - (sigma_e R_e X_i^{v,e} + t_e) |  /  (number of valid terms)

(Euclidean distances, not squared, as in the paper's Eq. 5). The trivial solution ``sigma_e -> 0, chi -> 0`` is
removed as the paper does: ``sigma_e = exp(s_e - mean_e s_e)``, so ``prod_e sigma_e = 1`` holds exactly. Every pair
is first divided by the mean distance of its valid points to its origin, so the parameters are O(1) whatever the
pair model's scale; :attr:`Alignment.edge_scale` is reported for the raw pairs.

``parameterisation``:

- ``"pointmaps"``: ``chi^v`` free (H, W, 3) tensors. Cameras are read afterwards: view v's pose is the similarity
  (Umeyama) from its own-frame prediction ``X^{v,(v, .)}`` (its best edge where it is the first view) onto ``chi^v``;
  its focal length the robust fit below on ``chi^v`` moved into that camera.
- ``"depth_pose"`` (DUSt3R's choice for recovering cameras): ``chi^v = cam_to_world_v(unproject(pixel, K_v,
  depth_v))`` through :mod:`vitlab.layers.camera`, with log depths, a pose per view (rotation as the first two columns
  of R, Gram-Schmidt, Zhou et al. 2019; translation) and one log focal length per view (square pixels, principal
  point at the image centre, pinhole).

Initialisation (``init="mst"``, as DUSt3R): edges are scored by the product of their two views' mean confidences;
a maximum spanning tree is grown from the best edge (Prim), placing each new view by the similarity that maps the
edge's prediction of the already-placed view onto it. Every edge's ``sigma_e, P_e`` then starts at the similarity of
its two predictions onto the placed views, the world is rescaled so ``prod sigma_e = 1``, and each view's camera
starts from its own-frame prediction: focal length by iteratively reweighted least squares towards the L1 fit of
``(u - cx, v - cy) = f (x, y) / z`` (DUSt3R uses Weiszfeld's algorithm for the same fit), pose by Umeyama, depth from
the prediction's z. ``init="identity"`` starts every camera at the world origin with identity pose (each view's own-
frame prediction as its world pointmap, ``sigma_e = 1``, ``P_e = I``): the floor of the benchmark.

Optimisation: Adam (``lr``) with a cosine decay to ``lr / 100`` for ``niter`` iterations. The result is expressed in
view 0's camera frame (its ``cam_to_world`` is the identity); world scale is the one fixed by ``prod sigma_e = 1``,
so poses are defined up to that global similarity.

Not in: DUSt3R's per-edge confidence transform options, principal-point optimisation, known-pose / known-focal
priors, sparse (MASt3R) alignment.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ...layers.camera import (
    intrinsics_matrix,
    invert_pose,
    matrix_to_rotation_6d,
    pixel_grid,
    pose_from_rt,
    rotation_6d_to_matrix,
    transform_points,
    unproject,
)
from .geometry import rotation_angle_deg, umeyama

__all__ = [
    "PARAMETERISATIONS",
    "Alignment",
    "alignment_errors",
    "all_edges",
    "global_align",
    "pairs_from_world",
    "predict_pairs",
    "reconstruct",
]

PARAMETERISATIONS = ("pointmaps", "depth_pose")
INITS = ("mst", "identity")
_EPS = 1e-8

Pairs = Mapping[tuple[int, int], Mapping[str, torch.Tensor]]


@dataclass
class Alignment:
    """The result of :func:`global_align`: V views of H x W pixels, E directed edges (in ``edges`` order).

    ``pointmaps`` (V, H, W, 3) world (view 0's camera frame); ``cam_to_world`` (V, 4, 4); ``focal`` (V,) pixels;
    ``K`` (V, 3, 3); ``depth`` (V, H, W) z-depth of ``pointmaps`` in each view's camera; ``edge_scale`` (E,) and
    ``edge_pose`` (E, 4, 4) map each raw pair into the world (``edge_scale * R X + t``); ``loss`` the final
    objective, ``init_loss`` the objective at the initialisation, ``history`` the loss per iteration.
    """

    pointmaps: torch.Tensor
    cam_to_world: torch.Tensor
    focal: torch.Tensor
    K: torch.Tensor
    depth: torch.Tensor
    edges: list[tuple[int, int]]
    edge_scale: torch.Tensor
    edge_pose: torch.Tensor
    loss: float
    init_loss: float
    history: list[float]


def all_edges(num_views: int) -> list[tuple[int, int]]:
    """Every unordered pair ``(i, j)``, ``i < j``, of ``num_views`` views."""
    return list(itertools.combinations(range(num_views), 2))


def _similarity(src: torch.Tensor, dst: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Umeyama on pointmaps (B, ..., 3) with weights (B, ...), back in ``src``'s dtype."""
    s, R, t = umeyama(src.flatten(1, -2), dst.flatten(1, -2), w.flatten(1))
    return s.to(src.dtype), R.to(src.dtype), t.to(src.dtype)


def _apply(s: torch.Tensor | None, R: torch.Tensor, t: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``s R X + t`` for batched similarities (B,) (None: 1), (B, 3, 3), (B, 3) and points (B, ..., 3).

    One batched matmul: for thousands of points per item it runs and back-propagates faster than
    ``transform_points``' broadcast product (which suits few points), and the optimisation loop is mostly this.
    """
    out = X.reshape(X.shape[0], -1, 3) @ R.transpose(-1, -2)
    out = out if s is None else s[:, None, None] * out
    return (out + t[:, None]).reshape(X.shape)


def _fit_focal(points: torch.Tensor, w: torch.Tensor, iters: int = 10) -> torch.Tensor:
    """Focal lengths (V,) of camera-frame pointmaps (V, H, W, 3): ``(u - cx, v - cy) = f (x, y) / z`` with the
    principal point at the image centre, by IRLS towards the L1 fit (robust to a few wild points)."""
    H, W = points.shape[1:3]
    uv = pixel_grid(H, W, points.dtype, points.device) - points.new_tensor([W / 2, H / 2])
    z = points[..., 2]
    w = w * (z > _EPS)
    p = points[..., :2] / z.clamp_min(_EPS)[..., None]
    weight = w
    for _ in range(iters + 1):
        f = (weight * (uv * p).sum(-1)).sum((1, 2)) / (weight * (p * p).sum(-1)).sum((1, 2)).clamp_min(_EPS)
        weight = w / (uv - f[:, None, None, None] * p).norm(dim=-1).clamp_min(1e-2)
    return f.abs().clamp_min(_EPS)


def _check_pairs(pairs: Pairs, num_views: int | None):
    if not isinstance(pairs, Mapping) or not pairs:
        raise ValueError(
            f"pairs must be a non-empty mapping {{(n, m): {{'pointmap': ...}}}}, got {type(pairs).__name__}"
        )
    for key in pairs:
        if (not isinstance(key, tuple) or len(key) != 2 or not all(isinstance(k, int) and k >= 0 for k in key)
                or key[0] == key[1]):  # fmt: skip
            raise ValueError(f"pairs key {key!r} must be a pair (n, m) of two different view indices >= 0")
    named = {v for key in pairs for v in key}
    V = max(named) + 1 if num_views is None else num_views
    if V < 2:
        raise ValueError(f"global alignment needs at least 2 views, got num_views={V}")
    for key in pairs:
        if max(key) >= V:
            raise ValueError(f"pairs key {key} names view {max(key)}, but num_views is {V} (views 0..{V - 1})")
    if missing := sorted(set(range(V)) - named):
        raise ValueError(f"views {missing} of num_views={V} appear in no pair of pairs {sorted(pairs)}")
    first = next(iter(pairs.values()))
    pts0 = first.get("pointmap") if isinstance(first, Mapping) else None
    if not isinstance(pts0, torch.Tensor) or pts0.ndim != 4 or pts0.shape[0] != 2 or pts0.shape[-1] != 3:
        got = tuple(pts0.shape) if isinstance(pts0, torch.Tensor) else type(pts0).__name__
        raise ValueError(f"pairs[{next(iter(pairs))}]['pointmap'] must be (2, H, W, 3), got {got}")
    H, W = pts0.shape[1:3]
    pts, conf, valid = [], [], []
    for key, pair in pairs.items():
        p = pair.get("pointmap") if isinstance(pair, Mapping) else None
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != (2, H, W, 3):
            got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"pairs[{key}]['pointmap'] must be (2, {H}, {W}, 3) like the other pairs, got {got}")
        for name, default in (("confidence", torch.ones(2, H, W)), ("valid", torch.ones(2, H, W, dtype=torch.bool))):
            value = pair.get(name, default)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (2, H, W):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"pairs[{key}][{name!r}] must be (2, {H}, {W}), got {got}")
        c = pair.get("confidence", torch.ones(2, H, W)).to(p.device, torch.float32)
        m = pair.get("valid", torch.ones(2, H, W, dtype=torch.bool)).to(p.device, torch.bool)
        m = m & torch.isfinite(p).all(-1)
        if not bool(torch.isfinite(c[m]).all()) or bool((c[m] < 0).any()):
            raise ValueError(f"pairs[{key}]['confidence'] must be finite and >= 0 at valid pixels")
        if not bool(m[0].any() and m[1].any()):
            raise ValueError(f"pairs[{key}] has a view without a valid pixel")
        pts.append(torch.where(m[..., None], p.float(), 0)), conf.append(torch.where(m, c, 0)), valid.append(m)
    return V, list(pairs), torch.stack(pts), torch.stack(conf), torch.stack(valid)


def _mst_init(V: int, edges: list[tuple[int, int]], X: torch.Tensor, w: torch.Tensor, score: torch.Tensor):
    """World pointmaps (V, H, W, 3) from a maximum spanning tree of the edge scores (module docstring)."""
    chi = X.new_zeros(V, *X.shape[2:])
    order = sorted(range(len(edges)), key=lambda e: -float(score[e]))
    e0 = order[0]
    chi[edges[e0][0]], chi[edges[e0][1]] = X[e0, 0], X[e0, 1]
    placed = set(edges[e0])
    while len(placed) < V:
        # Prim: the best edge with exactly one placed view
        step = next((e for e in order if (edges[e][0] in placed) != (edges[e][1] in placed)), None)
        if step is None:
            raise ValueError(f"pairs {edges} do not connect all {V} views: views {sorted(placed)} form one component")
        k = 0 if edges[step][0] in placed else 1  # the slot already placed
        s, R, t = _similarity(X[step, k][None], chi[edges[step][k]][None], w[step, k][None])
        new = edges[step][1 - k]
        chi[new] = _apply(s, R, t, X[step, 1 - k][None])[0]
        placed.add(new)
    return chi


def global_align(
    pairs: Pairs,
    num_views: int | None = None,
    *,
    parameterisation: str = "depth_pose",
    init: str = "mst",
    niter: int = 300,
    lr: float = 0.01,
) -> Alignment:
    """Align pairwise pointmaps into one world (module docstring; DUSt3R Sec. 3.4).

    Args:
        pairs: ``{(n, m): {"pointmap": (2, H, W, 3), "confidence": (2, H, W), "valid": (2, H, W) bool}}``: views n
            and m both in view n's camera frame (a :class:`.dust3r.Dust3R` output for one pair); confidence defaults
            to 1 and valid to all pixels. Every view must be the first view of at least one edge (its camera is read
            from that prediction) and the edges must connect all views.
        num_views: V (default: the largest view index named + 1).
        parameterisation: ``"pointmaps"`` (free world pointmaps) or ``"depth_pose"`` (depth + pose + focal per view).
        init: ``"mst"`` (maximum spanning tree, DUSt3R) or ``"identity"`` (every camera at the origin).
        niter: Adam iterations (0: return the initialisation).
        lr: Adam's learning rate (cosine decay to lr / 100).
    """
    if parameterisation not in PARAMETERISATIONS:
        raise ValueError(f"parameterisation must be one of {PARAMETERISATIONS}, got {parameterisation!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if niter < 0 or lr <= 0:
        raise ValueError(f"niter must be >= 0 and lr > 0, got niter={niter}, lr={lr}")
    V, edges, X, conf, valid = _check_pairs(pairs, num_views)
    E, H, W = len(edges), X.shape[2], X.shape[3]
    vw = valid.float()
    # each pair to mean distance 1: sigma_e is then O(1) whatever the pair model's scale
    pair_scale = (X.norm(dim=-1) * vw).sum((1, 2, 3)) / vw.sum((1, 2, 3))
    X = X / pair_scale.clamp_min(_EPS)[:, None, None, None, None]
    score = (conf * vw).sum((2, 3)) / vw.sum((2, 3)).clamp_min(1)  # (E, 2) mean confidence per view
    score = score.prod(-1)
    # each view's own-frame prediction: its best edge where it is the first view
    own = []
    for v in range(V):
        cands = [e for e in range(E) if edges[e][0] == v]
        if not cands:
            raise ValueError(f"view {v} is never the first view of a pair in pairs {edges}; its camera cannot be read "
                             f"from a prediction in another view's frame: add a pair ({v}, m)")  # fmt: skip
        own.append(max(cands, key=lambda e: float(score[e])))
    own_pts, own_w = X[own, 0], conf[own, 0]  # (V, H, W, 3), (V, H, W)
    idx = torch.tensor(edges, device=X.device)  # (E, 2)

    if init == "mst":
        chi = _mst_init(V, edges, X, conf, score)
        s_e, R_e, t_e = _similarity(X.flatten(1, 2), chi[idx].flatten(1, 2), conf.flatten(1, 2))
        g = s_e.log().mean().exp()  # rescale the world so that prod sigma_e = 1
        chi, s_e, t_e = chi / g, s_e / g, t_e / g
        s_cam, R_cam, t_cam = _similarity(own_pts, chi, own_w)
    else:
        chi = own_pts.clone()
        s_e, R_e, t_e = X.new_ones(E), torch.eye(3).expand(E, 3, 3).to(X), X.new_zeros(E, 3)
        s_cam, R_cam, t_cam = X.new_ones(V), torch.eye(3).expand(V, 3, 3).to(X), X.new_zeros(V, 3)
    focal = _fit_focal(own_pts, own_w)
    log_s = s_e.log().clone().requires_grad_()
    rot_e, trans_e = matrix_to_rotation_6d(R_e).clone().requires_grad_(), t_e.clone().requires_grad_()
    if parameterisation == "pointmaps":
        chi_p = chi.clone().requires_grad_()
        params = [chi_p]
    else:
        depth0 = (s_cam[:, None, None] * own_pts[..., 2]).clamp_min(1e-3 * float(own_pts[..., 2].abs().mean()))
        log_depth = depth0.log().clone().requires_grad_()
        rot_c, trans_c = matrix_to_rotation_6d(R_cam).clone().requires_grad_(), t_cam.clone().requires_grad_()
        log_f = focal.log().clone().requires_grad_()
        params = [log_depth, rot_c, trans_c, log_f]
        grid = pixel_grid(H, W, X.dtype, X.device)
        centre = (X.new_tensor(W / 2), X.new_tensor(H / 2))

    def world() -> tuple[torch.Tensor, ...]:
        if parameterisation == "pointmaps":
            return (chi_p,)
        f = log_f.exp()
        K = intrinsics_matrix(f, f, *centre)
        cam, _ = unproject(grid, K[:, None, None], depth=log_depth.exp())
        R = rotation_6d_to_matrix(rot_c)
        return _apply(None, R, trans_c, cam), pose_from_rt(R, trans_c), f

    def objective() -> torch.Tensor:
        sigma = (log_s - log_s.mean()).exp()  # prod sigma_e = 1: no collapse to sigma = 0, chi = 0
        mapped = _apply(sigma, rotation_6d_to_matrix(rot_e), trans_e, X.flatten(1, 2)).view_as(X)
        dist = ((world()[0][idx] - mapped).pow(2).sum(-1) + 1e-12).sqrt()  # (E, 2, H, W); sqrt: safe grad at 0
        return (conf * dist).sum() / vw.sum()

    opt = torch.optim.Adam([log_s, rot_e, trans_e, *params], lr=lr)
    history = []
    with torch.enable_grad():
        for it in range(niter):
            for group in opt.param_groups:
                group["lr"] = lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * it / niter)))
            loss = objective()
            history.append(float(loss.detach()))
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        final = float(objective())
        init_loss = history[0] if history else final
        if parameterisation == "pointmaps":
            pts = chi_p.detach()
            s_cam, R_cam, t_cam = _similarity(own_pts, pts, own_w)
            c2w = pose_from_rt(R_cam, t_cam)
            focal = _fit_focal(transform_points(invert_pose(c2w)[:, None, None], pts), own_w)
        else:
            pts, c2w, focal = (x.detach() for x in world())
        # express everything in view 0's camera frame
        to0 = invert_pose(c2w[0])
        pts = transform_points(to0, pts)
        c2w = to0 @ c2w
        sigma = (log_s - log_s.mean()).exp()
        edge_pose = to0 @ pose_from_rt(rotation_6d_to_matrix(rot_e), trans_e)
        depth = transform_points(invert_pose(c2w)[:, None, None], pts)[..., 2]
        f = focal
        K = intrinsics_matrix(f, f, X.new_tensor(W / 2), X.new_tensor(H / 2))
    return Alignment(pts, c2w, f, K, depth, edges, (sigma / pair_scale).detach(), edge_pose.detach(), final,
                     init_loss, history)  # fmt: skip


def pairs_from_world(
    pointmaps: torch.Tensor,
    cam_to_world: torch.Tensor,
    valid: torch.Tensor | None = None,
    edges: Sequence[tuple[int, int]] | None = None,
    scales: torch.Tensor | None = None,
) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Exact pairs from world pointmaps (V, H, W, 3) and cameras (V, 4, 4): for each directed edge ``(n, m)`` (default
    both directions of :func:`all_edges`) the pointmaps of n and m in n's camera frame, times ``scales[e]`` (E,)
    (default 1), with unit confidence and ``valid`` (V, H, W) (default all)."""
    V = pointmaps.shape[0]
    if edges is None:
        edges = [e for i, j in all_edges(V) for e in ((i, j), (j, i))]
    valid = torch.ones(pointmaps.shape[:3], dtype=torch.bool) if valid is None else valid
    out = {}
    for k, (n, m) in enumerate(edges):
        s = 1.0 if scales is None else scales[k]
        to_n = invert_pose(cam_to_world[n])
        pts = torch.stack([transform_points(to_n, pointmaps[n]), transform_points(to_n, pointmaps[m])]) * s
        out[(n, m)] = {"pointmap": pts, "confidence": torch.ones(pts.shape[:3]), "valid": valid[[n, m]]}
    return out


@torch.no_grad()
def predict_pairs(
    model: torch.nn.Module, images: torch.Tensor, edges: Sequence[tuple[int, int]] | None = None, batch_size: int = 32
) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Run a two-view pointmap model (``model(pairs)`` -> ``{"pointmap": (B, 2, H, W, 3), "confidence": (B, 2, H,
    W)}``, e.g. :class:`.dust3r.Dust3R`) on both directions of every edge of ``images`` (V, C, H, W) (default all
    pairs, :func:`all_edges`); returns the ``pairs`` mapping :func:`global_align` takes. The model's mode is kept."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 2:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be (V, C, H, W) with V >= 2 views, got {got}")
    V = images.shape[0]
    edges = all_edges(V) if edges is None else [tuple(e) for e in edges]
    for e in edges:
        if len(e) != 2 or e[0] == e[1] or not all(isinstance(v, int) and 0 <= v < V for v in e):
            raise ValueError(f"edges entry {e} must name two different views among the {V} images (0..{V - 1})")
    directed = list(dict.fromkeys(d for i, j in edges for d in ((i, j), (j, i))))
    was_training = model.training
    model.eval()
    try:
        preds = [model(torch.stack([images[[i, j]] for i, j in directed[k : k + batch_size]]))
                 for k in range(0, len(directed), batch_size)]  # fmt: skip
    finally:
        model.train(was_training)
    pts = torch.cat([p["pointmap"] for p in preds])
    conf = torch.cat([p["confidence"] for p in preds])
    return {e: {"pointmap": pts[k], "confidence": conf[k]} for k, e in enumerate(directed)}


def reconstruct(
    model: torch.nn.Module,
    images: torch.Tensor,
    edges: Sequence[tuple[int, int]] | None = None,
    *,
    batch_size: int = 32,
    **align_kwargs,
) -> Alignment:
    """:func:`predict_pairs` on ``images`` (V, C, H, W) then :func:`global_align` (``align_kwargs`` go there)."""
    return global_align(predict_pairs(model, images, edges, batch_size), images.shape[0], **align_kwargs)


def alignment_errors(
    result: Alignment, pointmaps: torch.Tensor, cam_to_world: torch.Tensor, valid: torch.Tensor | None = None
) -> dict[str, float]:
    """Errors of an alignment against ground-truth world ``pointmaps`` (V, H, W, 3) and ``cam_to_world`` (V, 4, 4):

    - ``rot_err_deg``: mean over view pairs i < j of the angle between estimated and true ``R_i^T R_j``;
    - ``centre_err``: mean distance of the camera centres after the best similarity (Umeyama) onto the true
      centres, divided by the mean distance of the true centres to their centroid (1.0: all centres at one point);
    - ``pointmap_err``: mean distance of the valid world points after the best similarity onto the truth, divided by
      the mean distance of the true points to their centroid.
    """
    V = cam_to_world.shape[0]
    valid = torch.ones(pointmaps.shape[:3], dtype=torch.bool) if valid is None else valid
    R, Rg = result.cam_to_world[:, :3, :3].double(), cam_to_world[:, :3, :3].double()
    i, j = zip(*all_edges(V), strict=True)
    rot = rotation_angle_deg(R[list(i)].transpose(-1, -2) @ R[list(j)], Rg[list(i)].transpose(-1, -2) @ Rg[list(j)])
    c, cg = result.cam_to_world[:, :3, 3].double(), cam_to_world[:, :3, 3].double()
    s, Rs, t = umeyama(c[None], cg[None])
    centre = (_apply(s, Rs, t, c[None])[0] - cg).norm(dim=-1).mean() / (cg - cg.mean(0)).norm(dim=-1).mean()
    p, g = result.pointmaps[valid].double(), pointmaps[valid].double()
    s, Rs, t = umeyama(p[None], g[None])
    pm = (_apply(s, Rs, t, p[None])[0] - g).norm(dim=-1).mean() / (g - g.mean(0)).norm(dim=-1).mean()
    return {"rot_err_deg": float(rot.mean()), "centre_err": float(centre), "pointmap_err": float(pm)}
