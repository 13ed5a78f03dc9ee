"""Camera-motion videos: determinism, cache, geometry of the motions, time reversal, errors, loader, make()."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import vitlab.data as vd
from vitlab.cli import run
from vitlab.data import synthetic
from vitlab.data.synthetic import camera_motion as cm
from vitlab.data.transforms import match_channels, normalize, resize_batch

SIZE, FRAMES = 32, 8


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test caches under its own tmp folder, never in ~/.cache."""
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "synthetic"


def _items(kind: str) -> vd.TensorImageDataset:
    """Fake items on black: ``textured`` noisy ellipses and rectangles, or ``discs`` of one bright level."""
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    images = np.zeros((20, 1, 28, 28), np.uint8)
    for i in range(20):
        if kind == "discs":
            images[i, 0][(yy - 13.5) ** 2 + (xx - 13.5) ** 2 <= 10**2] = 230
            continue
        cy, cx = g.uniform(12, 16, 2)
        ry, rx = g.uniform(7, 12, 2)
        ellipse = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        shape = ellipse if i % 2 else (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        images[i, 0][shape] = g.integers(60, 256, int(shape.sum()))
    return vd.TensorImageDataset(
        images=torch.from_numpy(images),
        targets=torch.arange(20) % 10,
        classes=list(vd.FASHION_MNIST_CLASSES),
        mean=(0.3,),
        std=(0.3,),
        name=f"fake_{kind}",
    )


@pytest.fixture(scope="module")
def textured() -> vd.TensorImageDataset:
    return _items("textured")


def gen(source: vd.TensorImageDataset, n: int = 11, seed: int = 0, **kw) -> synthetic.VideoClipDataset:
    kw = {"frames": FRAMES, "size": SIZE, "cache": False, **kw}
    return cm.generate_camera_motion_videos("train", n=n, seed=seed, source=source, **kw)


def test_deterministic_cached_and_independent_of_n(textured, tmp_cache):
    a = gen(textured, n=12, seed=4, cache=True)
    assert a.path is not None
    assert a.path.parent == tmp_cache
    b = gen(textured, n=12, seed=4, cache=True)  # from the file this time
    assert b.path == a.path
    c = gen(textured, n=5, seed=4)  # no cache: generated again
    for key in ("clips", "motion", "identity", "camera", "track"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
        assert torch.equal(getattr(a, key)[:5], getattr(c, key)), key
    assert not torch.equal(gen(textured, n=5, seed=5).clips, c.clips)
    assert len(list(tmp_cache.glob("camera_motion_videos-*.npz"))) == 1
    gen(textured, n=12, seed=4, cache=True, object_motion=0.0)  # another parameter, another entry
    assert len(list(tmp_cache.glob("camera_motion_videos-*.npz"))) == 2


def test_shapes_dtypes_and_dataset_api(textured, tmp_path):
    ds = gen(textured, n=22, object_motion=0.2)
    assert ds.clips.shape == (22, FRAMES, 1, SIZE, SIZE)
    assert ds.clips.dtype == torch.uint8
    assert ds.classes == list(cm.MOTIONS)
    assert ds.motion.tolist() == [i % 11 for i in range(22)]
    assert (ds.in_chans, ds.img_size, ds.num_frames) == (1, (SIZE, SIZE), FRAMES)
    assert ds.name == "camera_motion_videos/train"
    assert len(ds.mean) == len(ds.std) == 1
    assert [ds.classes[r] for r in ds.reverse_of] == [cm.MOTION_PAIRS[m] for m in ds.classes]
    item = ds[3]
    assert item["image"].shape == (FRAMES, 1, SIZE, SIZE)
    assert item["motion"].dtype == item["identity"].dtype == torch.int64
    assert item["motion"].ndim == 0
    assert item["camera"].shape == (FRAMES, 5)
    assert item["camera"].dtype == torch.float32
    assert item["track"].shape == (FRAMES, 2)
    batch = ds.collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, FRAMES, 1, SIZE, SIZE)
    assert batch["motion"].shape == (4,)
    assert batch["camera"].shape == (4, FRAMES, 5)
    with pytest.raises(IndexError):
        ds[22]
    sub = ds.subset([1, 5, 7])
    assert torch.equal(sub.clips, ds.clips[[1, 5, 7]])
    assert sub.motion.tolist() == [1, 5, 7]
    loaded = synthetic.VideoClipDataset.load(ds.save(tmp_path / "clips.npz"))
    for key in ("clips", "motion", "identity", "camera", "track"):
        assert torch.equal(getattr(loaded, key), getattr(ds, key)), key
    assert (loaded.classes, loaded.mean, loaded.params) == (ds.classes, ds.mean, ds.params)
    # every frame of every clip stays inside the canvas (so items cover all that is seen)
    H = cm.camera_homographies(ds.camera, SIZE, 3 * SIZE)
    corners = torch.tensor([[0.0, 0.0], [SIZE, 0.0], [0.0, SIZE], [SIZE, SIZE]], dtype=torch.float64)
    seen = cm._apply(H[..., None, :, :], corners)
    assert float(seen.min()) >= 0
    assert float(seen.max()) <= 3 * SIZE


def _shift(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """(dx, dy) with b(x) ~ a(x - d), by phase correlation (Hann window)."""
    win = torch.hann_window(a.shape[-1], periodic=False)
    win = win[:, None] * win[None]
    fa, fb = (torch.fft.fft2((x.double() - x.double().mean()) * win) for x in (a, b))
    cross = fb * fa.conj()
    r = torch.fft.ifft2(cross / cross.abs().clamp_min(1e-9)).real
    dy, dx = divmod(int(r.argmax()), r.shape[-1])
    n = r.shape[-1]
    return (dx + n // 2) % n - n // 2, (dy + n // 2) % n - n // 2


def test_phase_correlation_helper_finds_a_roll():
    x = torch.rand(32, 32)
    assert _shift(x, torch.roll(x, shifts=(2, -5), dims=(0, 1))) == (-5, 2)


@pytest.mark.parametrize("motion", ["pan_right", "pan_up"])
def test_pan_moves_content_by_the_camera_shift(textured, motion):
    ds = gen(textured, n=4, motions=(motion,), object_motion=0.0)
    for i in range(len(ds)):
        cam, track = ds.camera[i], ds.track[i]
        moved = track[-1] - track[0]  # the centre item's image motion over the clip, from the camera parameters
        axis = 0 if motion == "pan_right" else 1
        pan = float(cam[-1, axis] - cam[0, axis])
        assert pan > 0 if motion == "pan_right" else pan < 0
        # the content moves against the camera, by the pan times the zoom, turned by the (small) roll
        assert float(moved[axis]) * pan < 0
        expected = abs(pan) * math.exp(float(cam[0, 2]))
        assert float(moved.norm()) == pytest.approx(expected, rel=0.12)
        # the frames' content, halfway (the whole clip may move more than half a frame: phase correlation wraps)
        k = (FRAMES - 1) // 2
        measured = torch.tensor(_shift(ds.clips[i, 0, 0], ds.clips[i, k, 0]), dtype=torch.float32)
        half = track[k] - track[0]
        assert float((measured - half).abs().max()) <= 1.0, (measured, half)


def test_camera_conventions_of_roll_and_tilt():
    """Documented signs: a positive roll turns the picture counter-clockwise; a positive tilt makes the top recede."""
    pose = torch.zeros(5, dtype=torch.float64)
    home = cm.camera_homographies(pose, SIZE, 3 * SIZE)
    c = SIZE / 2
    assert cm._apply(home, torch.tensor([c, c], dtype=torch.float64)).tolist() == [1.5 * SIZE, 1.5 * SIZE]
    rolled = cm.camera_homographies(pose + torch.tensor([0, 0, 0, 0.3, 0]), SIZE, 3 * SIZE)
    right = cm._apply(home, torch.tensor([c + 10, c], dtype=torch.float64))  # the canvas point right of centre
    x, y = cm._apply(torch.linalg.inv(rolled), right).tolist()
    assert y < c - 2
    assert abs(math.hypot(x - c, y - c) - 10) < 1e-6
    tilted = cm.camera_homographies(pose + torch.tensor([0, 0, 0, 0, 0.3]), SIZE, 3 * SIZE)
    rows = torch.tensor([[[0.0, 0.0], [SIZE, 0.0]], [[0.0, SIZE], [SIZE, SIZE]]], dtype=torch.float64)
    top, bottom = (float(w[1, 0] - w[0, 0]) for w in cm._apply(tilted, rows))
    assert top > 1.2 * bottom  # the top row sees a wider strip of canvas: things there look smaller
    assert cm._apply(tilted, torch.tensor([c, c], dtype=torch.float64)).tolist() == [1.5 * SIZE, 1.5 * SIZE]


@pytest.mark.parametrize("motion", ["zoom_in", "zoom_out"])
def test_zoom_changes_apparent_size_monotonically(motion):
    ds = gen(_items("discs"), n=3, motions=(motion,), object_motion=0.0, max_items=0)
    for i in range(len(ds)):
        area = (ds.clips[i, :, 0] > 170).flatten(1).sum(1).double()  # the disc; the background stays below 120
        steps = area.diff()
        assert bool((steps > 0).all()) if motion == "zoom_in" else bool((steps < 0).all()), area.tolist()
        dz = float(ds.camera[i, -1, 2] - ds.camera[i, 0, 2])
        assert float(area[-1] / area[0]) == pytest.approx(math.exp(2 * dz), rel=0.15)


def test_reversed_clip_is_the_paired_motions_clip(textured):
    for motion in cm.MOTIONS[1::2]:
        pair = cm.MOTION_PAIRS[motion]
        a = gen(textured, n=3, motions=(motion,), object_motion=0.3)
        b = gen(textured, n=3, motions=(pair,), object_motion=0.3)
        assert torch.equal(b.clips, a.clips.flip(1)), motion
        assert torch.equal(b.camera, a.camera.flip(1)), motion
        assert torch.allclose(b.track, a.track.flip(1), atol=1e-4), motion
        assert torch.equal(a.identity, b.identity)
        # so a frame-averaging model sees the same input for both classes
        assert torch.equal(a.clips.sum(1), b.clips.sum(1))
    full = gen(textured, n=11)
    back = full.reverse()
    assert [back.classes[m] for m in back.motion.tolist()] == [cm.MOTION_PAIRS[m] for m in cm.MOTIONS]
    assert torch.equal(back.clips, full.clips.flip(1))
    assert torch.equal(back.reverse().clips, full.clips)
    with pytest.raises(ValueError, match="reversal"):
        gen(textured, n=2, motions=("zoom_in",)).reverse()


def test_static_clips_without_object_motion_have_identical_frames(textured):
    still = gen(textured, n=4, motions=("static",), object_motion=0.0)
    assert torch.equal(still.clips, still.clips[:, :1].expand_as(still.clips))
    assert torch.equal(still.camera, still.camera[:, :1].expand_as(still.camera))
    drifting = gen(textured, n=4, motions=("static",), object_motion=0.5)
    assert not torch.equal(drifting.clips, drifting.clips[:, :1].expand_as(drifting.clips))


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"frames": 1}, "frames"),
        ({"frames": 2.5}, "frames"),
        ({"motions": ("pan_left", "pan_sideways")}, "motions"),
        ({"motions": ()}, "motions"),
        ({"motions": ("pan_left", "pan_left")}, "motions"),
        ({"size": 8}, "size"),
        ({"size": 32, "canvas": 64}, "canvas"),
        ({"object_motion": 1.5}, "object_motion"),
        ({"max_items": -1}, "max_items"),
    ],
)
def test_bad_arguments_name_the_argument(textured, kw, name):
    with pytest.raises(ValueError, match=name):
        gen(textured, **kw)


def test_bad_split_and_generator_names(textured):
    with pytest.raises(ValueError, match="split"):
        cm.generate_camera_motion_videos("val", n=2, source=textured, cache=False)
    with pytest.raises(ValueError, match="camera_motion_videos"):
        synthetic.make_dataset("camera_motion_video")
    with pytest.raises(ValueError, match="frames"):
        synthetic.make("fmnist_scenes", "unused", n=2, frames=4)


def test_make_dataset_and_batch_loader_yield_normalised_clips(textured):
    ds = synthetic.make_dataset("camera_motion_videos", n=10, seed=1, frames=4, size=16, source=textured)
    assert isinstance(ds, synthetic.VideoClipDataset)
    assert ds.clips.shape == (10, 4, 1, 16, 16)
    loader = vd.BatchLoader(ds, batch_size=4, shuffle=True, seed=0)
    batches = list(loader.iter_batches(0))
    assert [len(b["motion"]) for b in batches] == [4, 4, 2]
    order = loader.epoch_order(0)[:4]
    first = batches[0]
    assert first["image"].dtype == torch.float32
    assert first["image"].shape == (4, 4, 1, 16, 16)
    assert torch.equal(first["image"], normalize(ds.clips[order], ds.mean, ds.std))
    assert torch.equal(first["motion"], ds.motion[order])
    assert first["camera"].shape == (4, 4, 5)
    rgb = next(vd.BatchLoader(ds, batch_size=3, shuffle=False, in_chans=3).iter_batches(0))
    assert rgb["image"].shape == (3, 4, 3, 16, 16)


def test_transforms_treat_clip_batches_frame_by_frame():
    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (2, 3, 3, 8, 8), dtype=torch.uint8, generator=g)
    frames = clips.flatten(0, 1)
    mean, std = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)
    assert torch.equal(normalize(clips, mean, std), normalize(frames, mean, std).unflatten(0, (2, 3)))
    for want in (1, 3):
        assert torch.equal(match_channels(clips, want), match_channels(frames, want).unflatten(0, (2, 3)))
    gray = match_channels(clips, 1)
    assert torch.equal(match_channels(gray, 3), match_channels(gray.flatten(0, 1), 3).unflatten(0, (2, 3)))
    x = normalize(clips, mean, std)
    for size in (4, 12):
        assert torch.equal(resize_batch(x, size), resize_batch(x.flatten(0, 1), size).unflatten(0, (2, 3)))
    assert resize_batch(x, 8) is x
    # 4-D batches: normalise is the plain affine map
    ref = (frames.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(normalize(frames, mean, std), ref, atol=1e-5)


def test_make_and_cli_write_clips_previews_and_info(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "videos"
    argv = [
        "data",
        "make",
        "camera_motion_videos",
        "--out",
        str(out),
        "--n",
        "12",
        "--frames",
        "4",
        "--size",
        "16",
        "--split",
        "test",
    ]
    assert run([*argv, "--data-dir", str(fmnist_dir)]) == 0
    assert str(out) in capsys.readouterr().out
    for name in ("clips.npz", "preview.png", "preview.gif", "info.json"):
        assert (out / name).stat().st_size > 0, name
    info = json.loads((out / "info.json").read_text())
    assert info["num_clips"] == 12
    assert info["num_frames"] == 4
    assert info["img_size"] == [16, 16]
    assert info["reverse_of"]["zoom_in"] == "zoom_out"
    assert sum(info["clips_per_motion"].values()) == 12
    ds = synthetic.VideoClipDataset.load(out / "clips.npz")
    assert ds.clips.shape == (12, 4, 1, 16, 16)
    assert ds.identity_classes == list(vd.FASHION_MNIST_CLASSES)
    assert run(["data", "make", "camera_motion_videos", "--out", str(out), "--frames", "1"]) == 2
    assert "frames" in capsys.readouterr().err
