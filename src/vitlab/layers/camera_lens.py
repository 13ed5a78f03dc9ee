"""Lens models on the normalised image plane: the unified camera model (xi) and Brown-Conrady distortion.

A camera-frame point X maps to ``m = (X, Y) / (Z + xi |X|)`` (unified camera model, Geyer & Daniilidis 2000, Mei &
Rives 2007; ``xi = 0`` is the pinhole), then through Brown-Conrady distortion with OpenCV's coefficient order
``(k1, k2, p1, p2, k3)``. Distortion is exact; undistortion runs Newton's method with the analytic Jacobian and
flags where it did not converge (beyond the radius where the polynomial stops being invertible). The pixel step
(``K``) and the conventions live in :mod:`.camera`.
"""

import torch

__all__ = ["distort", "lens_project", "lens_unproject", "undistort"]


def distort(m: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Brown-Conrady distortion of normalised points (..., 2); ``coeffs`` (..., 5) = (k1, k2, p1, p2, k3)."""
    return _distort_jacobian(m, coeffs)[0]


def _distort_jacobian(m: torch.Tensor, coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distorted points (..., 2) and the Jacobian entries (..., 3) ``(dxd/dx, dxd/dy = dyd/dx, dyd/dy)``."""
    x, y = m.unbind(-1)
    k1, k2, p1, p2, k3 = coeffs.unbind(-1)
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    dradial = k1 + r2 * (2 * k2 + 3 * k3 * r2)  # d radial / d r2
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    jxx = radial + 2 * x * x * dradial + 2 * p1 * y + 6 * p2 * x
    jxy = 2 * x * y * dradial + 2 * p1 * x + 2 * p2 * y
    jyy = radial + 2 * y * y * dradial + 6 * p1 * y + 2 * p2 * x
    return torch.stack([xd, yd], -1), torch.stack([jxx, jxy, jyy], -1)


def undistort(
    md: torch.Tensor, coeffs: torch.Tensor, iters: int = 12, tol: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised points m (..., 2) with ``distort(m) = md`` by Newton's method, and where it converged (...)."""
    m = md.clone()
    for _ in range(iters):
        d, jac = _distort_jacobian(m, coeffs)
        jxx, jxy, jyy = jac.unbind(-1)
        r = d - md
        det = jxx * jyy - jxy * jxy
        det = torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
        step = torch.stack([jyy * r[..., 0] - jxy * r[..., 1], jxx * r[..., 1] - jxy * r[..., 0]], -1) / det[..., None]
        step = step.clamp(-1.0, 1.0)  # a bounded step keeps far-off guesses from jumping across the image
        m = m - step
        # stop once every point has converged (eager mode only: traced and compiled graphs keep the fixed count)
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing()) and not bool((step.abs() > 1e-6).any()):
            break
    converged = (distort(m, coeffs) - md).norm(dim=-1) <= tol * (1 + md.norm(dim=-1))
    return m, converged & torch.isfinite(m).all(-1)


def lens_project(
    points: torch.Tensor, distortion: torch.Tensor | None = None, xi: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (distorted) image points (..., 2) of camera points (..., 3), and where they are projectable (...)."""
    X, Y, Z = points.unbind(-1)
    if xi is None:
        denom, valid = Z, Z > 1e-8
    else:
        norm = points.norm(dim=-1)
        denom = Z + xi * norm
        w = torch.where(xi <= 1, xi, 1 / xi.clamp(min=1e-8))  # UCM's projectable region: Z > -w |X|
        valid = (-w * norm < Z) & (denom > 1e-8)
    safe = torch.where(valid, denom, torch.ones_like(denom))
    m = torch.stack([X / safe, Y / safe], -1)
    return (m if distortion is None else distort(m, distortion)), valid


def lens_unproject(
    md: torch.Tensor, distortion: torch.Tensor | None = None, xi: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit camera rays (..., 3) through normalised (distorted) points (..., 2), and where they are valid (...)."""
    m, valid = (md, torch.ones_like(md[..., 0], dtype=torch.bool)) if distortion is None else undistort(md, distortion)
    r2 = (m * m).sum(-1)
    if xi is None:
        ray = torch.cat([m, torch.ones_like(r2)[..., None]], -1)
    else:  # the inverse of m = (X, Y) / (Z + xi |X|) on the unit sphere
        disc = 1 + (1 - xi * xi) * r2
        valid = valid & (disc >= 0)
        scale = (xi + disc.clamp(min=0).sqrt()) / (1 + r2)
        ray = torch.cat([scale[..., None] * m, (scale - xi)[..., None]], -1)
    return ray / ray.norm(dim=-1, keepdim=True), valid
