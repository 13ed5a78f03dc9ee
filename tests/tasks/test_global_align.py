"""Global alignment (paper 37, DUSt3R Sec. 3.4): exact pairs from Render3D ground truth are aligned back to the true
cameras, focal lengths and pointmaps (up to one similarity); a corrupted edge is ignored when its confidence is low;
reconstruct() feeds both directions of each pair; bad input is named."""

import pytest
import torch

from vitlab.layers.camera import axis_angle_to_matrix
from vitlab.tasks import create_task_model
from vitlab.tasks.multiview.global_align import (
    alignment_errors,
    all_edges,
    global_align,
    pairs_from_world,
    reconstruct,
)

DIRECTED = [e for i, j in all_edges(3) for e in ((i, j), (j, i))]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # hundreds of Adam steps on tiny tensors: intra-op threads only add synchronisation (10x slower on a loaded box)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scene():
    from vitlab.data.synthetic import make_dataset

    return make_dataset("render3d", split="test", n=2, views=3, size=16)[1]


def _pairs(scene, seed=0):
    """Exact pairs, each in its first view's frame, each times its own random scale (returned too)."""
    scales = torch.exp(torch.randn(len(DIRECTED), generator=torch.Generator().manual_seed(seed)))
    return pairs_from_world(scene["pointmap"], scene["cam_to_world"], scene["valid"], DIRECTED, scales), scales


def _errors(result, scene):
    return alignment_errors(result, scene["pointmap"], scene["cam_to_world"], scene["valid"])


@pytest.mark.parametrize("parameterisation", ["pointmaps", "depth_pose"])
def test_exact_pairs_are_aligned_from_identity_cameras(scene, parameterisation):
    pairs, scales = _pairs(scene)
    # init="identity": every camera starts at the origin (the floor), so the optimisation itself must find the poses
    floor = _errors(global_align(pairs, parameterisation=parameterisation, init="identity", niter=0), scene)
    assert floor["rot_err_deg"] > 10
    assert floor["centre_err"] == pytest.approx(1.0, abs=1e-6)
    result = global_align(pairs, parameterisation=parameterisation, init="identity", niter=200)
    err = _errors(result, scene)
    assert err["rot_err_deg"] < 1.0, err
    assert err["centre_err"] < 0.02, err
    assert err["pointmap_err"] < 0.01, err
    assert result.loss < 0.02 * result.init_loss
    # the focal lengths are recovered in pixels (no scale ambiguity there)
    torch.testing.assert_close(result.focal, scene["K"][:, 0, 0], rtol=0.01, atol=0)
    # each edge's scale undoes that pair's random scale, up to one global factor (prod sigma_e = 1 fixes the gauge)
    ratio = result.edge_scale * scales
    assert float(ratio.std() / ratio.mean()) < 0.01
    # the gauge: each pair is divided by its mean point distance d_e, then prod sigma_e = 1 (no collapse to 0)
    d = torch.stack([p["pointmap"][p["valid"]].norm(dim=-1).mean() for p in pairs.values()])
    assert float((result.edge_scale * d).log().mean()) == pytest.approx(0.0, abs=1e-4)
    # and the returned edge similarities carry every raw pair onto the returned world pointmaps
    spread = result.pointmaps[scene["valid"]].norm(dim=-1).mean()
    for e, (n, m) in enumerate(result.edges):
        pose, pair = result.edge_pose[e], pairs[(n, m)]
        mapped = result.edge_scale[e] * pair["pointmap"] @ pose[:3, :3].T + pose[:3, 3]
        gap = (mapped - result.pointmaps[[n, m]]).norm(dim=-1)[pair["valid"]].mean()
        assert float(gap / spread) < 0.01, (n, m)
    # the world is view 0's camera frame
    torch.testing.assert_close(result.cam_to_world[0], torch.eye(4), atol=1e-5, rtol=0)
    assert result.pointmaps.shape == (3, 16, 16, 3)
    assert result.depth.shape == (3, 16, 16)


def test_spanning_tree_init_is_exact_on_exact_pairs(scene):
    pairs, _ = _pairs(scene, seed=1)
    err = _errors(global_align(pairs, parameterisation="depth_pose", niter=0), scene)
    assert max(err.values()) < 1e-3, err


def _tug_of_war(scene, conf_bad):
    """Two views, both directions: (0, 1) exact; (1, 0) noisy, view 0's points turned 40 deg about their centroid."""
    pairs = pairs_from_world(scene["pointmap"][:2], scene["cam_to_world"][:2], scene["valid"][:2])
    pts = pairs[(1, 0)]["pointmap"].clone()
    R = axis_angle_to_matrix(torch.tensor([0.0, 40 * torch.pi / 180, 0.0]))
    centre = pts[1][pairs[(1, 0)]["valid"][1]].mean(0)
    pts[1] = (pts[1] - centre) @ R.T + centre
    pts = pts + 0.02 * pts.norm(dim=-1).mean() * torch.randn(pts.shape, generator=torch.Generator().manual_seed(3))
    pairs[(1, 0)] = {**pairs[(1, 0)], "pointmap": pts, "confidence": torch.full((2, 16, 16), conf_bad)}
    return pairs


@pytest.mark.parametrize("parameterisation", ["pointmaps", "depth_pose"])
def test_a_low_confidence_edge_is_ignored(scene, parameterisation):
    two = {k: scene[k][:2] for k in ("pointmap", "cam_to_world", "valid")}
    equal = _errors(global_align(_tug_of_war(scene, 1.0), parameterisation=parameterisation, niter=100), two)
    low = _errors(global_align(_tug_of_war(scene, 1e-3), parameterisation=parameterisation, niter=100), two)
    assert equal["rot_err_deg"] > 3, equal  # the corrupted edge pulls when it counts like the clean one
    assert low["rot_err_deg"] < 1.0, low
    assert low["pointmap_err"] < 0.5 * equal["pointmap_err"]


class _OraclePairs(torch.nn.Module):
    """A stand-in pair model: images are constant planes holding their view index; it returns the exact pair."""

    def __init__(self, scene) -> None:
        super().__init__()
        self.scene = scene

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        views = image[:, :, 0, 0, 0].round().long().tolist()
        edges = [tuple(v) for v in views]
        pairs = pairs_from_world(self.scene["pointmap"], self.scene["cam_to_world"], self.scene["valid"], edges)
        pts = torch.stack([pairs[e]["pointmap"] for e in edges])
        return {"pointmap": pts, "confidence": torch.stack([pairs[e]["valid"].float() for e in edges])}


def test_reconstruct_runs_both_directions_of_each_edge(scene):
    images = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 16, 16)
    result = reconstruct(_OraclePairs(scene), images, edges=[(0, 1), (1, 2)], batch_size=3, niter=0)
    assert result.edges == [(0, 1), (1, 0), (1, 2), (2, 1)]
    assert max(_errors(result, scene).values()) < 1e-3


def test_reconstruct_with_a_dust3r_model():
    model = create_task_model(
        "dust3r", "vit_micro_patch4_28", img_size=16, dec_dim=32, dec_depth=1,
        backbone_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2},
    )  # fmt: skip
    model.train()
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = reconstruct(model, images, niter=5)
    assert model.training  # the mode is restored
    assert len(result.edges) == 6
    assert len(result.history) == 5
    assert result.pointmaps.shape == (3, 16, 16, 3)
    assert result.cam_to_world.shape == (3, 4, 4)
    assert torch.isfinite(result.pointmaps).all()
    assert torch.isfinite(result.focal).all()
    R = result.cam_to_world[:, :3, :3]
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3).expand(3, 3, 3), atol=1e-4, rtol=0)


def test_bad_input_is_named(scene):
    pairs, _ = _pairs(scene)
    with pytest.raises(ValueError, match="at least 2 views"):
        global_align({(0, 1): pairs[(0, 1)]}, num_views=1)
    with pytest.raises(ValueError, match=r"names view 5, but num_views is 3"):
        global_align({**pairs, (0, 5): pairs[(0, 1)]}, num_views=3)
    with pytest.raises(ValueError, match=r"views \[3\] of num_views=4 appear in no pair"):
        global_align(pairs, num_views=4)
    with pytest.raises(ValueError, match="two different view indices"):
        global_align({(1, 1): pairs[(0, 1)]})
    small = {"pointmap": torch.zeros(2, 8, 8, 3)}
    with pytest.raises(ValueError, match=r"pairs\[\(1, 2\)\]\['pointmap'\] must be \(2, 16, 16, 3\)"):
        global_align({**pairs, (1, 2): small})
    with pytest.raises(ValueError, match=r"pairs\[\(0, 1\)\]\['confidence'\] must be \(2, 16, 16\)"):
        global_align({**pairs, (0, 1): {**pairs[(0, 1)], "confidence": torch.ones(16, 16)}})
    with pytest.raises(ValueError, match="view 2 is never the first view"):
        global_align({k: v for k, v in pairs.items() if k[0] != 2})
    with pytest.raises(ValueError, match="do not connect all"):
        global_align({(0, 1): pairs[(0, 1)], (1, 0): pairs[(1, 0)], (2, 3): pairs[(1, 2)], (3, 2): pairs[(2, 1)]})
    with pytest.raises(ValueError, match="parameterisation must be one of"):
        global_align(pairs, parameterisation="poses")
    images = torch.zeros(3, 3, 16, 16)
    with pytest.raises(ValueError, match=r"images must be \(V, C, H, W\) with V >= 2"):
        reconstruct(_OraclePairs(scene), images[:1])
    with pytest.raises(ValueError, match=r"edges entry \(0, 7\) must name two different views among the 3"):
        reconstruct(_OraclePairs(scene), images, edges=[(0, 7)])
