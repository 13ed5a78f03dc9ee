"""`vitlab bench --task` on video task models: clips (B, T, C, H, W) are timed and counted as clips."""

import pytest

from vitlab.bench import count_flops
from vitlab.bench.runner import bench_models
from vitlab.tasks import create_task_model


def _clip_model(frames: int):
    return create_task_model(
        "vivit_fe", "vit_micro_patch4_28", img_size=16, num_frames=frames, temporal_depth=1,
        backbone_kwargs={"depth": 1},
    )  # fmt: skip


def test_video_task_models_are_benched_on_clips():
    rows = bench_models(["vit_micro_patch4_28"], batch_size=2, warmup=0, repeats=1, min_seconds=0.0, latency=False,
                        build=lambda name: _clip_model(4))  # fmt: skip
    assert rows[0].img_size == 16
    assert rows[0].in_chans == 1
    assert "clips of 4 frames" in rows[0].note
    # a clip of 4 frames costs about four frames: FLOPs scale with T
    two, four = (count_flops(_clip_model(t), (t, 1, 16, 16)) for t in (2, 4))
    assert four > 1.8 * two


def test_input_size_must_be_an_image_or_a_clip():
    with pytest.raises(ValueError, match="frames, channels, height, width"):
        count_flops(_clip_model(2), (1, 16))
