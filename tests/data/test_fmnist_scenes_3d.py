"""FMNIST-Scenes-3D: determinism, geometry against an independent float64 camera model, occlusion, flips, files.

The geometry checks recompute everything from the documented conventions (box corners, ``K``, the ground plane
``y = camera_height``) in NumPy float64, not through the module's own helpers.
"""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab.data as vd
from vitlab.data import synthetic
from vitlab.data.synthetic import fmnist_scenes_3d as fs3
from vitlab.data.synthetic import scenes3d

EPS = 1e-3  # pixels: pixel centres closer than this to a billboard's outline may fall either way (float32)


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test caches under its own tmp folder, never in ~/.cache."""
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "synthetic"


def fake_items(shapes: str) -> vd.TensorImageDataset:
    """40 items on black: filled rectangles (and ellipses, with ``shapes="mixed"``) of random size and level."""
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    images = np.zeros((40, 1, 28, 28), np.uint8)
    for i in range(40):
        cy, cx = g.uniform(11, 17, 2)
        ry, rx = g.uniform(4, 12, 2)
        if shapes == "mixed" and i % 2:
            shape = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            shape = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        images[i, 0][shape] = g.integers(80, 256)
    return vd.TensorImageDataset(
        torch.from_numpy(images), torch.arange(40) % 10, list(vd.FASHION_MNIST_CLASSES), (0.3,), (0.3,)
    )


@pytest.fixture(scope="module")
def items() -> vd.TensorImageDataset:
    return fake_items("mixed")


@pytest.fixture(scope="module")
def rects() -> vd.TensorImageDataset:
    """Rectangles only: an item is opaque over its whole billboard, so its outline is the projected rectangle."""
    return fake_items("rects")


@pytest.fixture(scope="module")
def scenes(items: vd.TensorImageDataset) -> fs3.FMNISTScenes3D:
    return fs3.generate_fmnist_scenes_3d("train", n=24, seed=3, source=items, cache=False)


def corners(box: np.ndarray) -> np.ndarray:
    """(8, 3) float64 corners of one (7,) box: centre + R_y(yaw) (sx w/2, sy h/2, sz l/2), signs x-major."""
    x, y, z, w, h, length, yaw = box.astype(np.float64)
    c, s = np.cos(yaw), np.sin(yaw)
    R = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    signs = np.array(list(itertools.product((-1, 1), repeat=3)), np.float64)
    return np.array([x, y, z]) + (signs * [w / 2, h / 2, length / 2]) @ R.T


def project(points: np.ndarray, K: np.ndarray) -> np.ndarray:
    K = K.astype(np.float64)
    return np.stack(
        [K[0, 0] * points[..., 0] / points[..., 2] + K[0, 2], K[1, 1] * points[..., 1] / points[..., 2] + K[1, 2]], -1
    )


def billboard(box: np.ndarray) -> np.ndarray:
    """The (4, 3) outline of a box's mid-plane, in order around it."""
    c = corners(box)
    mid = (c[0::2] + c[1::2]) / 2  # average the sz = -1 and +1 corners: (sx, sy) = (-,-), (-,+), (+,-), (+,+)
    return mid[[0, 2, 3, 1]]


def pixel_centres(H: int, W: int) -> np.ndarray:
    v, u = np.mgrid[:H, :W] + 0.5
    return np.stack([u, v], -1)  # (H, W, 2)


def cross2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def quad_distance(quad: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance of points (..., 2) inside a convex quad (4, 2) from its nearest edge line: > 0 inside, < 0 outside."""
    edges = np.roll(quad, -1, axis=0) - quad
    orientation = np.sign(cross2(quad, np.roll(quad, -1, axis=0)).sum())
    margins = [orientation * cross2(e, points - a) / np.linalg.norm(e) for a, e in zip(quad, edges, strict=True)]
    return np.min(margins, axis=0)


def plane_depth(box: np.ndarray, K: np.ndarray, H: int, W: int) -> np.ndarray:
    """z where each pixel centre's ray meets the box's mid-plane (H, W)."""
    p0, p1, _, p3 = billboard(box)
    normal = np.cross(p1 - p0, p3 - p0)
    K = K.astype(np.float64)
    uv = pixel_centres(H, W)
    rays = np.stack([(uv[..., 0] - K[0, 2]) / K[0, 0], (uv[..., 1] - K[1, 2]) / K[1, 1], np.ones((H, W))], -1)
    return (normal @ p0) / (rays @ normal)


def test_deterministic_for_a_seed(items: vd.TensorImageDataset) -> None:
    a = fs3.generate_fmnist_scenes_3d("train", n=12, seed=5, source=items, cache=False)
    b = fs3.generate_fmnist_scenes_3d("train", n=12, seed=5, source=items, cache=False)
    for key in ("images", "panoptic", "labels", "offsets", "boxes3d", "intrinsics", "camera_height"):
        assert getattr(a, key).numpy().tobytes() == getattr(b, key).numpy().tobytes(), key
    c = fs3.generate_fmnist_scenes_3d("train", n=12, seed=6, source=items, cache=False)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.intrinsics, c.intrinsics)
    # scene i depends on (seed, split, i) alone, not on how many scenes are made
    d = fs3.generate_fmnist_scenes_3d("train", n=5, seed=5, source=items, cache=False)
    assert torch.equal(d.images, a.images[:5])
    assert torch.equal(d.boxes3d, a.boxes3d[: int(d.offsets[-1])])
    test = fs3.generate_fmnist_scenes_3d("test", n=5, seed=5, source=items, cache=False)
    assert not torch.equal(test.images, d.images)


def test_sample_keys_and_collate(scenes: fs3.FMNISTScenes3D) -> None:
    assert scenes.img_size == (96, 96)
    assert scenes.name == "fmnist_scenes_3d/train"
    sample = scenes[1]
    M = len(sample["labels"])
    expected = {
        "image": (torch.uint8, (1, 96, 96)),
        "semantic": (torch.int64, (96, 96)),
        "panoptic": (torch.int64, (96, 96)),
        "boxes": (torch.float32, (M, 4)),
        "labels": (torch.int64, (M,)),
        "masks": (torch.bool, (M, 96, 96)),
        "depth": (torch.float32, (96, 96)),
        "boxes3d": (torch.float32, (M, 7)),
        "centers2d": (torch.float32, (M, 2)),
        "intrinsics": (torch.float32, (3, 3)),
        "camera_height": (torch.float32, ()),
    }
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sample.items()} == expected
    batch = scenes.collate([scenes[i] for i in range(3)])
    assert batch["depth"].shape == (3, 96, 96)
    assert batch["intrinsics"].shape == (3, 3, 3)
    assert batch["camera_height"].shape == (3,)
    assert [len(b) for b in batch["boxes3d"]] == [len(scenes[i]["labels"]) for i in range(3)]
    assert scenes.num_instances().float().mean() > 1.5
    # the 2-D targets follow the 2-D rules: boxes from masks, masks disjoint, every instance visible (a scene's
    # only item may be smaller than the visibility threshold: scenes are never left empty)
    for i in range(len(scenes)):
        s = scenes[i]
        assert torch.equal(s["boxes"], synthetic.masks_to_boxes(s["masks"]))
        assert bool((s["masks"].sum(0) <= 1).all())
        area = s["masks"].sum((1, 2))
        assert bool((area >= (fs3.MIN_VISIBLE_PIXELS if len(area) > 1 else 1)).all())


def test_centres_project_to_centers2d(scenes: fs3.FMNISTScenes3D) -> None:
    for i in range(len(scenes)):
        s = scenes[i]
        K = s["intrinsics"].numpy()
        assert K[0, 0] == K[1, 1]
        assert K[0, 2] == 48
        assert K[1, 2] == pytest.approx(0.3 * 96)
        expected = project(s["boxes3d"][:, :3].numpy().astype(np.float64), K)
        np.testing.assert_allclose(s["centers2d"].numpy(), expected, atol=1e-3)
        # items stand on the ground: bottom face at y = camera_height
        b = s["boxes3d"].numpy()
        np.testing.assert_allclose(b[:, 1] + b[:, 4] / 2, float(s["camera_height"]), atol=1e-5)
        assert bool((b[:, 5] == np.float32(fs3.BILLBOARD_LENGTH)).all())


def test_masks_lie_on_their_billboards(scenes: fs3.FMNISTScenes3D) -> None:
    """Every visible pixel of an instance is inside its projected billboard, occluded or not; the 2-D box is inside
    the projected 3-D box's bounding box."""
    uv = pixel_centres(96, 96)
    for i in range(len(scenes)):
        s = scenes[i]
        K = s["intrinsics"].numpy()
        for j, box in enumerate(s["boxes3d"].numpy()):
            quad = project(billboard(box), K)
            assert bool((quad_distance(quad, uv[s["masks"][j].numpy()]) > -EPS).all()), (i, j)
            uv8 = project(corners(box), K)
            x1, y1, x2, y2 = s["boxes"][j].tolist()
            assert x1 >= uv8[:, 0].min() - 0.5 - EPS
            assert y1 >= uv8[:, 1].min() - 0.5 - EPS
            assert x2 <= uv8[:, 0].max() + 0.5 + EPS
            assert y2 <= uv8[:, 1].max() + 0.5 + EPS


def test_opaque_billboards_fill_their_outline(rects: vd.TensorImageDataset) -> None:
    """A lone rectangle item covers exactly the pixel centres inside its projected billboard."""
    one = fs3.generate_fmnist_scenes_3d("train", n=16, seed=1, max_items=1, source=rects, cache=False)
    uv = pixel_centres(96, 96)
    for i in range(len(one)):
        s = one[i]
        (box,) = s["boxes3d"].numpy()
        margin = quad_distance(project(billboard(box), s["intrinsics"].numpy()), uv)
        mask = s["masks"][0].numpy()
        assert bool(mask[margin > EPS].all())
        assert not bool(mask[margin < -EPS].any())


@pytest.mark.parametrize("source", ["rects", "fmnist"])
def test_ground_contact_and_size_against_depth(request: pytest.FixtureRequest, source: str) -> None:
    """Facing the camera, an item's lowest pixel meets the ground at v = cy + f h_cam / z, and it is f h / z tall."""
    items = request.getfixturevalue("rects") if source == "rects" else request.getfixturevalue("fmnist_test")
    kwargs = {"max_items": 1, "max_yaw": 0.0, "source": items, "cache": False}
    one = fs3.generate_fmnist_scenes_3d("test", n=24, seed=2, **kwargs)
    heights = []
    for i in range(len(one)):
        s = one[i]
        (box,) = s["boxes3d"].numpy().astype(np.float64)
        K = s["intrinsics"].numpy().astype(np.float64)
        rows = np.flatnonzero(s["masks"][0].numpy().any(1))
        bottom = K[1, 1] * float(s["camera_height"]) / box[2] + K[1, 2]  # projection of (x, y_ground, z)
        top = bottom - K[1, 1] * box[4] / box[2]
        if bottom > 96 or top < 0:  # cut by the canvas
            continue
        # the billboard is the item's bright extent, so its first and last rows are the item's, to rasterisation
        assert abs(rows[-1] + 1 - bottom) <= 0.5 + EPS, i
        assert abs(rows[0] - top) <= 0.5 + EPS, i
        heights.append((box[2], rows[-1] + 1 - rows[0]))
    assert len(heights) >= 12
    # far items are smaller: pixel height times depth is about f h, whatever the depth
    z, px = np.array(heights).T
    assert np.corrcoef(z, px)[0, 1] < -0.5


def test_turned_items_touch_the_ground(scenes: fs3.FMNISTScenes3D) -> None:
    """With yaw, an unoccluded item's lowest pixel lies between its bottom edge's two projected ends."""
    checked = 0
    for i in range(len(scenes)):
        s = scenes[i]
        K = s["intrinsics"].numpy()
        panoptic = s["panoptic"].numpy()
        for j, box in enumerate(s["boxes3d"].numpy()):
            uv = project(billboard(box), K)
            near, far = uv[2:, 1].max(), uv[2:, 1].min()  # the outline's bottom edge: sy = +1
            rows = np.flatnonzero(s["masks"][j].numpy().any(1))
            if near > 96 or (panoptic[rows[-1] + 1 :] > 0).any():  # cut by the canvas, or something lower in front
                continue
            assert far - 1.0 <= rows[-1] + 1 <= near + 0.5 + EPS, (i, j)
            checked += 1
    assert checked >= 10


def test_depth_map(scenes: fs3.FMNISTScenes3D) -> None:
    """Instance pixels hold the z of their billboard's plane on the pixel's ray; the ground its own z; the sky 0."""
    v = pixel_centres(96, 96)[..., 1]
    for i in range(len(scenes)):
        s = scenes[i]
        depth, panoptic = s["depth"].numpy(), s["panoptic"].numpy()
        K = s["intrinsics"].numpy().astype(np.float64)
        for j, box in enumerate(s["boxes3d"].numpy()):
            on = panoptic == j + 1
            np.testing.assert_allclose(depth[on], plane_depth(box, K, 96, 96)[on], rtol=1e-4)
        with np.errstate(divide="ignore"):
            ground = K[1, 1] * float(s["camera_height"]) / (v - K[1, 2])
        ground = np.where((v > K[1, 2]) & (ground <= scenes3d.MAX_DEPTH), ground, 0)
        np.testing.assert_allclose(depth[panoptic == 0], ground[panoptic == 0], rtol=1e-4)
        assert bool((depth[: int(K[1, 2])] == 0)[panoptic[: int(K[1, 2])] == 0].all())


def test_nearer_items_occlude(rects: vd.TensorImageDataset) -> None:
    """With opaque billboards, each pixel shows the nearest billboard whose outline holds it (a z-buffer), and
    instances are numbered far to near."""
    crowded = fs3.generate_fmnist_scenes_3d(
        "train", n=16, seed=4, min_items=3, max_items=5, depth_range=(2.0, 8.0), source=rects, cache=False
    )
    uv = pixel_centres(96, 96)
    overlaps = 0
    for i in range(len(crowded)):
        s = crowded[i]
        K = s["intrinsics"].numpy()
        boxes = s["boxes3d"].numpy()
        assert bool((np.diff(boxes[:, 2]) <= 0).all()), "not in painter's order"
        margin = np.stack([quad_distance(project(billboard(b), K), uv) for b in boxes])  # (M, H, W)
        z = np.stack([plane_depth(b, K, 96, 96) for b in boxes])
        covered = margin > 0
        expected = np.where(covered.any(0), np.where(covered, z, np.inf).argmin(0) + 1, 0)
        clear = (np.abs(margin) > EPS).all(0)
        assert np.array_equal(s["panoptic"].numpy()[clear], expected[clear]), i
        overlaps += int((covered.sum(0) > 1).sum())
    assert overlaps > 100, "the scenes should overlap"


def test_hidden_items_are_dropped(rects: vd.TensorImageDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = {"split": "train", "n": 16, "seed": 4, "min_items": 4, "max_items": 6, "source": rects, "cache": False}
    default = fs3.generate_fmnist_scenes_3d(**kwargs)
    monkeypatch.setattr(fs3, "MIN_VISIBLE_FRACTION", 0.8)
    strict = fs3.generate_fmnist_scenes_3d(**kwargs)
    assert len(strict.labels) < len(default.labels)
    assert not torch.equal(strict.images, default.images), "dropped items must not be drawn"
    for i in range(len(strict)):
        s = strict[i]
        assert torch.equal(s["boxes"], synthetic.masks_to_boxes(s["masks"]))


def test_flip_moves_3d_targets(scenes: fs3.FMNISTScenes3D) -> None:
    batch = scenes.collate([scenes[i] for i in range(6)])
    flip = torch.tensor([True, False, True, True, False, True])
    out = scenes.hflip(batch, flip)
    for b in range(6):
        f = bool(flip[b])
        assert torch.equal(out["image"][b], batch["image"][b].flip(-1) if f else batch["image"][b])
        assert torch.equal(out["depth"][b], batch["depth"][b].flip(-1) if f else batch["depth"][b])
        K, boxes3d = out["intrinsics"][b], out["boxes3d"][b]
        # the flipped targets describe the flipped image: centres project, depth re-renders, boxes enclose masks
        torch.testing.assert_close(out["centers2d"][b], scenes3d.project_points(boxes3d[:, :3], K))
        depth = scenes3d.render_depth(out["panoptic"][b], boxes3d, K, out["camera_height"][b])
        torch.testing.assert_close(depth, out["depth"][b], rtol=1e-5, atol=1e-5)
        uv = pixel_centres(96, 96)
        for j, box in enumerate(boxes3d.numpy()):
            quad = project(billboard(box), K.numpy())
            assert bool((quad_distance(quad, uv[out["masks"][b][j].numpy()]) > -EPS).all())
        if f:
            assert float(K[0, 2]) == 96 - float(batch["intrinsics"][b][0, 2])
            torch.testing.assert_close(boxes3d[:, [0, 6]], -batch["boxes3d"][b][:, [0, 6]])
    # these scenes' principal point is the image centre, which a flip keeps: move it to see cx -> W - cx
    shifted = dict(batch, intrinsics=batch["intrinsics"] + torch.tensor([[0, 0, 3.0], [0, 0, 0], [0, 0, 0]]))
    assert scenes.hflip(shifted, flip)["intrinsics"][:, 0, 2].tolist() == [45, 51, 45, 45, 51, 45]
    again = scenes.augment(batch, torch.Generator().manual_seed(0), p=0.0)
    assert torch.equal(again["boxes3d"][0], batch["boxes3d"][0])


def test_save_load_subset_and_2d_view(scenes: fs3.FMNISTScenes3D, tmp_path: Path) -> None:
    path = scenes.save(tmp_path / "s3d.npz")
    loaded = synthetic.Scene3DDataset.load(path)
    for key in ("images", "panoptic", "labels", "offsets", "boxes3d", "intrinsics", "camera_height"):
        assert torch.equal(getattr(loaded, key), getattr(scenes, key)), key
    assert loaded.params == scenes.params
    a, b = loaded[5], scenes[5]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a 2-D reader takes the same file as a plain scene set; a 3-D reader refuses a 2-D file
    flat = synthetic.SceneDataset.load(path)
    assert torch.equal(flat[5]["masks"], b["masks"])
    assert "depth" not in flat[5]
    flat.save(tmp_path / "flat.npz")
    with pytest.raises(vd.DataError, match=r"lacks arrays.*boxes3d"):
        synthetic.Scene3DDataset.load(tmp_path / "flat.npz")
    sub = scenes.subset([7, 2])
    assert isinstance(sub, fs3.FMNISTScenes3D)
    for j, i in enumerate((7, 2)):
        a, b = sub[j], scenes[i]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_cache_round_trip(items: vd.TensorImageDataset, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = fs3.generate_fmnist_scenes_3d("train", n=6, seed=2, source=items)
    assert list(tmp_cache.glob("fmnist_scenes_3d-*.npz")) == [first.path]

    def no_generation(*args: object, **kwargs: object) -> None:
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(fs3, "_generate", no_generation)
    second = fs3.generate_fmnist_scenes_3d("train", n=6, seed=2, source=items)
    assert isinstance(second, fs3.FMNISTScenes3D)
    assert torch.equal(second.boxes3d, first.boxes3d)
    assert torch.equal(second.intrinsics, first.intrinsics)
    for change in ({"max_yaw": 30.0}, {"focal": 1.2}, {"horizon": 0.4}, {"canvas": (64, 96)}, {"seed": 3}):
        with pytest.raises(AssertionError, match="generated again"):
            fs3.generate_fmnist_scenes_3d(**{"split": "train", "n": 6, "seed": 2, "source": items, **change})


def test_wide_canvas(items: vd.TensorImageDataset) -> None:
    wide = fs3.generate_fmnist_scenes_3d("test", n=4, seed=0, canvas=(64, 96), source=items, cache=False)
    assert wide.img_size == (64, 96)
    K = wide.intrinsics[0]
    assert float(K[0, 2]) == 48
    assert float(K[1, 2]) == pytest.approx(0.3 * 64)
    assert wide[0]["depth"].shape == (64, 96)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"canvas": 16}, r"canvas=16 is out of range; expected 32\.\.256"),
        ({"canvas": (64, 300)}, r"canvas=300 is out of range"),
        ({"canvas": (64, 64, 64)}, r"canvas=.*\(H, W\)"),
        ({"depth_range": (5.0, 2.0)}, r"depth_range=\(5\.0, 2\.0\) is out of range"),
        ({"depth_range": (0.5, 10.0)}, r"depth_range=.*1 <= near"),
        ({"max_yaw": 90}, r"max_yaw=90\.0 is out of range; expected 0\.\.80"),
        ({"focal": 0}, r"focal=0\.0 is out of range"),
        ({"focal_jitter": 0.9}, r"focal_jitter=0\.9 is out of range"),
        ({"camera_height": 0}, r"camera_height=0\.0 is out of range"),
        ({"horizon": 1.0}, r"horizon=1\.0 is out of range"),
        ({"size_jitter": -0.1}, r"size_jitter=-0\.1 is out of range"),
        ({"max_items": 17}, r"max_items=17 is out of range; expected 1\.\.16"),
        ({"min_items": 3, "max_items": 2}, r"min_items=3 is out of range; expected 1\.\.2"),
        ({"split": "val"}, r"split='val'"),
        ({"seed": -1}, r"seed=-1 is out of range"),
        ({"n": 0}, r"n=0 is out of range"),
    ],
)
def test_bad_arguments(items: vd.TensorImageDataset, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        synthetic.make_dataset("fmnist_scenes_3d", **{"n": 2, "source": items, "cache": False, **kwargs})


def test_source_with_other_classes_is_refused(items: vd.TensorImageDataset) -> None:
    other = vd.TensorImageDataset(items.images, items.targets % 3, ["a", "b", "c"], (0.3,), (0.3,))
    with pytest.raises(ValueError, match="3 classes; expected Fashion-MNIST's 10"):
        fs3.generate_fmnist_scenes_3d(n=2, source=other, cache=False)


def test_make_writes_data_preview_and_info(fmnist_dir: Path, tmp_path: Path) -> None:
    out = synthetic.make("fmnist_scenes_3d", tmp_path / "out", n=6, split="test", seed=1, data_dir=fmnist_dir)
    info = json.loads((out / "info.json").read_text())
    assert info["img_size"] == [96, 96]  # the generator's own default, not the 2-D one's
    assert info["params"]["max_items"] == 4
    assert info["num_scenes"] == 6
    with Image.open(out / "preview.png") as im:
        assert im.width > 600
    loaded = synthetic.Scene3DDataset.load(out / "scenes.npz")
    made = synthetic.make_dataset("fmnist_scenes_3d", n=6, split="test", seed=1, data_dir=fmnist_dir)
    assert torch.equal(loaded.boxes3d, made.boxes3d)
    small = synthetic.make("fmnist_scenes_3d", tmp_path / "small", n=2, canvas=48, max_items=2, data_dir=fmnist_dir)
    assert json.loads((small / "info.json").read_text())["img_size"] == [48, 48]
