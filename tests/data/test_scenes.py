"""FMNIST-Scenes and the synthetic registry: determinism, cache, target consistency, flips, errors, make()."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab.data as vd
from vitlab.data import synthetic
from vitlab.data.synthetic import fmnist_scenes as fs

CANVAS = 64


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test caches under its own tmp folder, never in ~/.cache."""
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "synthetic"


@pytest.fixture(scope="module")
def items() -> vd.TensorImageDataset:
    """A fake item source: 40 filled ellipses and rectangles of random size and gray level on black."""
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    images = np.zeros((40, 1, 28, 28), np.uint8)
    for i in range(40):
        cy, cx = g.uniform(11, 17, 2)
        ry, rx = g.uniform(5, 12, 2)
        if i % 2:
            shape = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            shape = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        images[i, 0][shape] = g.integers(60, 256)
    return vd.TensorImageDataset(
        images=torch.from_numpy(images),
        targets=torch.arange(40) % 10,
        classes=list(vd.FASHION_MNIST_CLASSES),
        mean=(0.3,),
        std=(0.3,),
        name="fake_items",
    )


@pytest.fixture(scope="module")
def scenes(items: vd.TensorImageDataset) -> fs.FMNISTScenes:
    return fs.generate_fmnist_scenes("train", n=48, seed=3, source=items, cache=False)


def check_targets(sample: dict, max_items: int = 6) -> None:
    """Every property a scene's targets must have, whichever way they were produced."""
    image, semantic, panoptic = sample["image"], sample["semantic"], sample["panoptic"]
    boxes, labels, masks = sample["boxes"], sample["labels"], sample["masks"]
    M = len(labels)
    H, W = image.shape[-2:]
    assert 1 <= M <= max_items
    assert boxes.shape == (M, 4)
    assert masks.shape == (M, H, W)
    assert bool((masks.sum(dim=0) <= 1).all()), "instance masks overlap"
    expected_semantic = torch.zeros(H, W, dtype=torch.int64)
    expected_panoptic = torch.zeros(H, W, dtype=torch.int64)
    for j in range(M):
        ys, xs = torch.nonzero(masks[j], as_tuple=True)
        assert len(ys) > 0, f"instance {j} has an empty mask"
        # boxes cover whole pixels: x2, y2 are one past the last column, row
        assert boxes[j].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        expected_semantic[masks[j]] = labels[j] + 1
        expected_panoptic[masks[j]] = j + 1
    assert torch.equal(semantic, expected_semantic)
    assert torch.equal(panoptic, expected_panoptic)
    # every labelled pixel shows its item, which is above the item threshold
    assert bool((image[0][panoptic > 0] > fs.ITEM_THRESHOLD).all())


def test_deterministic_for_a_seed(items: vd.TensorImageDataset) -> None:
    a = fs.generate_fmnist_scenes("train", n=24, seed=5, source=items, cache=False)
    b = fs.generate_fmnist_scenes("train", n=24, seed=5, source=items, cache=False)
    for key in ("images", "panoptic", "labels", "offsets"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert a.mean == b.mean
    assert a.std == b.std
    c = fs.generate_fmnist_scenes("train", n=24, seed=6, source=items, cache=False)
    assert not torch.equal(a.images, c.images)
    # scene i depends on (seed, split, i) alone, not on how many scenes are made
    d = fs.generate_fmnist_scenes("train", n=8, seed=5, source=items, cache=False)
    assert torch.equal(d.images, a.images[:8])
    assert torch.equal(d.labels, a.labels[: int(d.offsets[-1])])
    test = fs.generate_fmnist_scenes("test", n=8, seed=5, source=items, cache=False)
    assert not torch.equal(test.images, d.images)


def test_global_rng_is_untouched(items: vd.TensorImageDataset) -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    a = fs.generate_fmnist_scenes("train", n=4, seed=1, source=items, cache=False)
    torch.manual_seed(123)
    np.random.seed(123)
    b = fs.generate_fmnist_scenes("train", n=4, seed=1, source=items, cache=False)
    assert torch.equal(a.images, b.images)


def test_cache_round_trip(items: vd.TensorImageDataset, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = fs.generate_fmnist_scenes("train", n=16, seed=2, source=items)
    files = list(tmp_cache.glob("fmnist_scenes-*.npz"))
    assert files == [first.path]
    assert not list(tmp_cache.glob(".*.part")), "a temp file was left behind"

    def no_generation(*args: object, **kwargs: object) -> None:
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(fs, "_generate", no_generation)
    second = fs.generate_fmnist_scenes("train", n=16, seed=2, source=items)
    assert isinstance(second, fs.FMNISTScenes)
    for key in ("images", "panoptic", "labels", "offsets"):
        assert torch.equal(getattr(first, key), getattr(second, key)), key
    assert second.mean == first.mean
    assert second.thing_classes == first.thing_classes
    assert second.params == first.params
    # every parameter is in the key: another one misses the cache
    for change in ({"seed": 3}, {"n": 17}, {"max_items": 5}, {"background": "plain"}, {"canvas": 48}):
        with pytest.raises(AssertionError, match="generated again"):
            fs.generate_fmnist_scenes(**{"split": "train", "n": 16, "seed": 2, "source": items, **change})
    other_source = vd.TensorImageDataset(
        items.images.flip(-1), items.targets, list(items.classes), items.mean, items.std
    )
    with pytest.raises(AssertionError, match="generated again"):
        fs.generate_fmnist_scenes("train", n=16, seed=2, source=other_source)


def test_damaged_cache_entry_is_regenerated(items: vd.TensorImageDataset) -> None:
    first = fs.generate_fmnist_scenes("train", n=8, seed=4, source=items)
    first.path.write_bytes(b"not a zip file")
    again = fs.generate_fmnist_scenes("train", n=8, seed=4, source=items)
    assert torch.equal(again.images, first.images)
    assert fs.FMNISTScenes.load(again.path).params == first.params


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(vd.DataError, match="cannot read"):
        synthetic.SceneDataset.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros(3))
    with pytest.raises(vd.DataError, match="lacks arrays"):
        synthetic.SceneDataset.load(bad)


def test_shapes_dtypes_and_attributes(scenes: fs.FMNISTScenes) -> None:
    assert len(scenes) == 48
    assert scenes.classes == ["background", *vd.FASHION_MNIST_CLASSES]
    assert scenes.thing_classes == list(vd.FASHION_MNIST_CLASSES)
    assert scenes.in_chans == 1
    assert scenes.img_size == (CANVAS, CANVAS)
    assert scenes.name == "fmnist_scenes/train"
    scaled = scenes.images.double() / 255
    assert scenes.mean == pytest.approx((scaled.mean().item(),))
    assert scenes.std == pytest.approx((scaled.std(unbiased=False).item(),))
    sample = scenes[0]
    M = len(sample["labels"])
    expected = {
        "image": (torch.uint8, (1, CANVAS, CANVAS)),
        "semantic": (torch.int64, (CANVAS, CANVAS)),
        "panoptic": (torch.int64, (CANVAS, CANVAS)),
        "boxes": (torch.float32, (M, 4)),
        "labels": (torch.int64, (M,)),
        "masks": (torch.bool, (M, CANVAS, CANVAS)),
    }
    assert set(sample) == set(expected)
    for key, (dtype, shape) in expected.items():
        assert sample[key].dtype == dtype, key
        assert tuple(sample[key].shape) == shape, key
    assert torch.equal(scenes[-1]["image"], scenes[47]["image"])
    with pytest.raises(IndexError):
        scenes[48]


def test_targets_are_consistent(scenes: fs.FMNISTScenes) -> None:
    min_area = fs.MIN_VISIBLE_AREA * CANVAS * CANVAS
    for i in range(len(scenes)):
        sample = scenes[i]
        check_targets(sample)
        assert bool((sample["masks"].sum(dim=(1, 2)) >= min_area).all()), "an (almost) hidden item was kept"
    counts = scenes.num_instances()
    assert counts.float().mean() > 2, "scenes should usually hold several items"
    assert scenes.labels.unique().numel() == 10


def test_dropped_items_are_not_drawn(items: vd.TensorImageDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = {"split": "train", "n": 32, "seed": 0, "background": "plain", "source": items, "cache": False}
    default = fs.generate_fmnist_scenes(**kwargs)
    monkeypatch.setattr(fs, "MIN_VISIBLE_FRACTION", 0.7)
    strict = fs.generate_fmnist_scenes(**kwargs)
    assert len(strict.labels) < len(default.labels), "a stricter visibility threshold should drop more items"
    for i in range(len(strict)):
        sample = strict[i]
        check_targets(sample)
        # a plain background is at most 0.2 * 255: anything brighter is an item, and must be a labelled one
        assert bool((sample["panoptic"][sample["image"][0] > 52] > 0).all()), "a dropped item is still drawn"


@pytest.mark.parametrize("canvas", [32, 96])
def test_other_canvas_sizes(items: vd.TensorImageDataset, canvas: int) -> None:
    scenes = fs.generate_fmnist_scenes("test", n=12, seed=0, canvas=canvas, max_items=3, source=items, cache=False)
    assert scenes.img_size == (canvas, canvas)
    for i in range(len(scenes)):
        check_targets(scenes[i], max_items=3)


def test_collate_and_subset(scenes: fs.FMNISTScenes) -> None:
    batch = scenes.collate([scenes[i] for i in (0, 1, 2)])
    assert batch["image"].shape == (3, 1, CANVAS, CANVAS)
    assert batch["image"].dtype == torch.uint8
    assert batch["semantic"].shape == batch["panoptic"].shape == (3, CANVAS, CANVAS)
    for key in ("boxes", "labels", "masks"):
        assert isinstance(batch[key], list)
        assert len(batch[key]) == 3
        assert torch.equal(batch[key][1], scenes[1][key])
    with pytest.raises(ValueError, match="at least one"):
        scenes.collate([])

    sub = scenes.subset(10, seed=1)
    assert isinstance(sub, fs.FMNISTScenes)
    assert len(sub) == 10
    assert sub.mean == scenes.mean
    assert torch.equal(sub.images, scenes.subset(10, seed=1).images)
    picked = scenes.subset([5, 2, 40])
    for j, i in enumerate((5, 2, 40)):
        a, b = picked[j], scenes[i]
        for key in a:
            assert torch.equal(a[key], b[key]), key
    with pytest.raises(ValueError, match="out of range"):
        scenes.subset(49)


def test_flip_moves_every_target(scenes: fs.FMNISTScenes) -> None:
    batch = scenes.collate([scenes[i] for i in range(8)])
    flipped = scenes.augment(batch, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(flipped["image"], batch["image"].flip(-1))
    assert torch.equal(flipped["semantic"], batch["semantic"].flip(-1))
    assert torch.equal(flipped["panoptic"], batch["panoptic"].flip(-1))
    for b in range(8):
        assert torch.equal(flipped["masks"][b], batch["masks"][b].flip(-1))
        x1, y1, x2, y2 = batch["boxes"][b].unbind(1)
        assert torch.equal(flipped["boxes"][b], torch.stack([CANVAS - x2, y1, CANVAS - x1, y2], dim=1))
        assert type(flipped["boxes"][b]) is torch.Tensor
        check_targets({k: flipped[k][b] for k in flipped})
    assert torch.equal(batch["image"], scenes.collate([scenes[i] for i in range(8)])["image"]), "input changed"
    unflipped = scenes.augment(batch, torch.Generator().manual_seed(0), p=0.0)
    for key in ("image", "semantic", "panoptic"):
        assert torch.equal(unflipped[key], batch[key])


def test_flip_decisions_come_from_the_generator(scenes: fs.FMNISTScenes) -> None:
    batch = scenes.collate([scenes[i] for i in range(32)])
    state = torch.get_rng_state()
    a = scenes.augment(batch, torch.Generator().manual_seed(7))
    assert torch.equal(state, torch.get_rng_state()), "augment used the global RNG"
    torch.manual_seed(99)
    b = scenes.augment(batch, torch.Generator().manual_seed(7))
    assert torch.equal(a["image"], b["image"])
    flips = [torch.equal(a["image"][i], batch["image"][i].flip(-1)) for i in range(32)]
    kept = [torch.equal(a["image"][i], batch["image"][i]) for i in range(32)]
    assert any(flips)
    assert any(kept)
    for i in range(32):
        check_targets({k: a[k][i] for k in a})
        assert torch.equal(a["masks"][i], batch["masks"][i].flip(-1) if flips[i] else batch["masks"][i])


def test_masks_to_boxes_of_empty_mask() -> None:
    masks = torch.zeros(2, 5, 7, dtype=torch.bool)
    masks[1, 1:3, 6] = True
    assert synthetic.masks_to_boxes(masks).tolist() == [[0, 0, 0, 0], [6, 1, 7, 3]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "mnist_scenes"}, r"name='mnist_scenes'.*fmnist_scenes"),
        ({"canvas": 16}, r"canvas=16 is out of range; expected 32\.\.256"),
        ({"canvas": 300}, r"canvas=300 is out of range; expected 32\.\.256"),
        ({"n": 0}, r"n=0 is out of range; expected 1\."),
        ({"max_items": 0}, r"max_items=0 is out of range; expected 1\.\.16"),
        ({"min_items": 4, "max_items": 3}, r"min_items=4 is out of range; expected 1\.\.3"),
        ({"split": "val"}, r"split='val'.*\['train', 'test'\]"),
        ({"background": "stripes"}, r"background='stripes'"),
        ({"scale": (0.5, 0.2)}, r"scale=\(0\.5, 0\.2\) is out of range"),
        ({"seed": -1}, r"seed=-1 is out of range"),
    ],
)
def test_bad_arguments(items: vd.TensorImageDataset, kwargs: dict, match: str) -> None:
    kwargs = {"name": "fmnist_scenes", "n": 4, "source": items, "cache": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        synthetic.make_dataset(**kwargs)


def test_make_rejects_bad_arguments_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="canvas=8"):
        synthetic.make("fmnist_scenes", tmp_path / "out", canvas=8)
    with pytest.raises(ValueError, match="expected one of"):
        synthetic.make("nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_make_writes_data_preview_and_info(fmnist_dir: Path, tmp_path: Path) -> None:
    out = synthetic.make("fmnist_scenes", tmp_path / "out", n=20, split="test", seed=1, data_dir=fmnist_dir)
    assert out == tmp_path / "out"
    with Image.open(out / "preview.png") as im:
        assert im.width > 400
        assert im.height > 200
    info = json.loads((out / "info.json").read_text())
    assert info["num_scenes"] == 20
    assert info["params"]["split"] == "test"
    assert info["params"]["canvas"] == 64
    assert info["classes"][0] == "background"
    assert info["thing_classes"] == list(vd.FASHION_MNIST_CLASSES)
    assert sum(info["instances_per_class"].values()) == info["num_instances"]
    loaded = synthetic.SceneDataset.load(out / "scenes.npz")
    made = synthetic.make_dataset("fmnist_scenes", split="test", n=20, seed=1, data_dir=fmnist_dir)
    assert torch.equal(loaded.images, made.images)
    assert torch.equal(loaded.panoptic, made.panoptic)
    for i in range(len(loaded)):
        check_targets(loaded[i])


def test_real_fashion_mnist_items(fmnist_dir: Path, fmnist_test: vd.TensorImageDataset) -> None:
    scenes = synthetic.make_dataset("fmnist_scenes", split="test", n=16, seed=0, data_dir=fmnist_dir, cache=False)
    assert scenes.thing_classes == list(vd.FASHION_MNIST_CLASSES)
    for i in range(len(scenes)):
        check_targets(scenes[i])
    # the same scenes from the loaded split passed as the item source
    same = fs.generate_fmnist_scenes("test", n=16, seed=0, source=fmnist_test, cache=False)
    assert torch.equal(scenes.images, same.images)
