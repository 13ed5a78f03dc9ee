"""4M (tasks/generative/fourm.py): masking budgets, decoder mask, per-modality loss, iterative unmasking, errors."""

import pytest
import torch
import torch.nn.functional as F

from vitlab.layers.tokenizers import WordTokenizer
from vitlab.tasks import create_task_model
from vitlab.tasks.generative.fourm_parts import (
    DecoderBlock,
    decoder_mask,
    per_modality_loss,
    sample_counts,
    scene_words,
    select_tokens,
    unmask_schedule,
)

TINY = {"img_size": 16, "levels": (3, 3), "semseg_levels": (3, 3), "tokenizer_hidden": 4, "bins": 4,
        "max_items": 2, "input_budget": 8, "target_budget": 8, "dec_depth": 1, "dec_heads": 2,
        "backbone_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2}}  # fmt: skip


def _model(**kw):
    return create_task_model("fourm", "vit_micro_patch4_28", **{**TINY, **kw})


def test_dirichlet_budgets_sum_to_the_budget_and_respect_availability():
    torch.manual_seed(0)
    caps = torch.tensor([[64, 64, 0, 6, 21]] * 200 + [[5, 0, 64, 0, 0]] * 200)
    counts = sample_counts(caps, 48, "dirichlet", alpha=0.5)
    assert torch.equal(counts.sum(1), torch.full((400,), 48))
    assert bool((counts <= caps).all())
    assert bool((counts[caps == 0] == 0).all())
    # Dirichlet(0.5) shares are spread: often one of the two big modalities takes (almost) everything
    first = counts[:200, 0].float() / 48
    assert float(((first < 0.1) | (first > 0.9)).float().mean()) > 0.2


def test_uniform_budgets_follow_token_counts():
    torch.manual_seed(0)
    caps = torch.tensor([[64, 16, 0]] * 300)
    counts = sample_counts(caps, 40, "uniform")
    assert torch.equal(counts.sum(1), torch.full((300,), 40))
    assert bool((counts[:, 2] == 0).all())
    share = counts[:, 0].float().mean() / 40
    assert share == pytest.approx(0.8, abs=0.03)  # 64 of the 80 available tokens
    first = counts[:, 0].float() / 40
    assert float(((first < 0.1) | (first > 0.9)).float().mean()) < 0.05  # never one-sided, unlike Dirichlet


def test_budget_errors_are_named():
    caps = torch.tensor([[4, 4]])
    with pytest.raises(ValueError, match="empty budget"):
        sample_counts(caps, 0)
    with pytest.raises(ValueError, match="exceeds the tokens available"):
        sample_counts(caps, 9)
    with pytest.raises(ValueError, match="masking"):
        sample_counts(caps, 4, "random")
    with pytest.raises(ValueError, match="input_budget must be >= 1"):
        _model(input_budget=0)
    with pytest.raises(ValueError, match="exceed the tokens"):
        _model(input_budget=200)


def test_select_tokens_are_disjoint_and_match_counts():
    torch.manual_seed(0)
    lengths = [4, 6, 3]
    n_in, n_tgt = torch.tensor([[2, 1, 0], [0, 3, 0]]), torch.tensor([[1, 2, 0], [2, 0, 1]])
    idx_in, idx_tgt = select_tokens(n_in, n_tgt, lengths)
    mod = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    for b in range(2):
        assert not set(idx_in[b].tolist()) & set(idx_tgt[b].tolist())
        assert torch.equal(torch.bincount(mod[idx_in[b]], minlength=3), n_in[b])
        assert torch.equal(torch.bincount(mod[idx_tgt[b]], minlength=3), n_tgt[b])


def test_decoder_targets_of_different_modalities_do_not_attend_to_each_other():
    torch.manual_seed(0)
    mods = torch.tensor([[0, 0, 1, 1, 1]])
    mask = decoder_mask(mods)
    assert mask.shape == (1, 1, 5, 5)
    assert torch.equal(mask[0, 0].int(), torch.tensor([[1, 1, 0, 0, 0]] * 2 + [[0, 0, 1, 1, 1]] * 3))
    block = DecoderBlock(16, 2).eval()
    x, ctx = torch.randn(1, 5, 16), torch.randn(1, 7, 16)
    y = block(x, ctx, mask)
    x2 = x.clone()
    x2[0, 0] = torch.randn(16)  # change a modality-0 query
    y2 = block(x2, ctx, mask)
    assert torch.allclose(y[0, 2:], y2[0, 2:], atol=1e-6)  # modality-1 targets do not see it
    assert not torch.allclose(y[0, 1], y2[0, 1])  # its own modality does


def test_loss_is_averaged_per_modality():
    torch.manual_seed(0)
    logits = [torch.randn(6, 5), torch.randn(2, 3), torch.randn(0, 4)]
    targets = [torch.randint(0, 5, (6,)), torch.randint(0, 3, (2,)), torch.zeros(0, dtype=torch.long)]
    loss, per = per_modality_loss(logits, targets)
    hand_a = sum(-F.log_softmax(logits[0][i], -1)[targets[0][i]] for i in range(6)) / 6
    hand_b = sum(-F.log_softmax(logits[1][i], -1)[targets[1][i]] for i in range(2)) / 2
    assert float(loss) == pytest.approx(float(hand_a + hand_b) / 2, rel=1e-5)  # not the token mean (8 tokens)
    assert float(per[2]) == 0.0


def test_single_pair_masks_read_source_and_predict_target_only():
    torch.manual_seed(0)
    model = _model(pair=("rgb", "semseg"))
    idx_in, idx_tgt = model._draw_masks(torch.ones(3, 5, dtype=torch.bool))
    names = model.modalities
    assert {names[int(m)] for m in model.mod_ids[idx_in].unique()} == {"rgb"}
    assert {names[int(m)] for m in model.mod_ids[idx_tgt].unique()} == {"semseg"}
    assert idx_in.shape == (3, 8)
    assert idx_tgt.shape == (3, 8)


def test_unmask_schedule_reveals_everything():
    for length, steps in ((64, 1), (64, 4), (64, 8), (5, 5), (16, 3)):
        schedule = unmask_schedule(length, steps)
        assert len(schedule) == steps
        assert sum(schedule) == length
        assert min(schedule) >= 1
    assert unmask_schedule(64, 4) == [5, 14, 21, 24]  # cos(pi/8 s) masked shares: 59, 45, 24, 0 left
    with pytest.raises(ValueError, match="steps"):
        unmask_schedule(4, 5)


def test_generate_one_step_is_the_parallel_argmax_and_iterative_fills_all_tokens():
    torch.manual_seed(0)
    model = _model().eval()
    batch = model.example_batch(2)
    tokens = model.tokenize(batch["image"], **model.forward_kwargs(batch))
    out = model.generate({"rgb": tokens["rgb"]}, "semseg", steps=1)
    # by hand: encode all rgb tokens, decode all semseg positions at once, argmax
    full = model._embed_all({"rgb": tokens["rgb"]}, 2)
    rgb = torch.arange(model.offsets[0], model.offsets[1])
    seg = model.modalities.index("semseg")
    context = model._encode(full[:, rgb])
    hand = model.heads["semseg"](model._decode(context, torch.arange(model.offsets[seg], model.offsets[seg + 1])
                                               .expand(2, -1))).argmax(-1)  # fmt: skip
    assert torch.equal(out, hand)
    many = model.generate({"rgb": tokens["rgb"], "caption": tokens["caption"]}, "semseg", steps=16)
    assert many.shape == (2, 16)
    assert int(many.max()) < model.heads["semseg"].out_features
    assert model.detokenize("semseg", many).shape == (2, 16, 16)


def test_scene_words_read_left_to_right():
    text = WordTokenizer(["bag", "coat", "t-shirt_top"], bins=4)
    boxes = torch.tensor([[20.0, 0, 30, 10], [0, 4, 8, 12], [10, 10, 14, 14]])
    caption, words = scene_words(boxes, torch.tensor([8, 4, 0]), ["T-shirt/top", *"abc", "Coat", *"efg", "Bag"],
                                 text, 32, max_items=2)  # fmt: skip
    assert caption == ["coat", "t-shirt_top"]
    assert words == ["coat", "<loc_0>", "<loc_0>", "<loc_1>", "<loc_1>", "t-shirt_top", "<loc_1>", "<loc_1>",
                     "<loc_1>", "<loc_1>"]  # fmt: skip


def test_unknown_modality_and_bad_calls_are_named():
    with pytest.raises(ValueError, match="modalities must be distinct names"):
        _model(modalities=("rgb", "sound"))
    with pytest.raises(ValueError, match="pair must be"):
        _model(pair=("rgb", "normals"))
    model = _model().eval()
    tokens = {"rgb": torch.zeros(1, 16, dtype=torch.long)}
    with pytest.raises(ValueError, match="unknown modality 'sound'"):
        model.generate(tokens, "sound")
    with pytest.raises(ValueError, match="unknown modality 'sound'"):
        model.forward_tokens({**tokens, "sound": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="at least one source"):
        model.generate({"semseg": tokens["rgb"]}, "semseg")
    with pytest.raises(ValueError, match="rgb tokens must be int64"):
        model.forward_tokens({"rgb": torch.zeros(1, 15, dtype=torch.long)})
    with pytest.raises(ValueError, match="unknown inputs"):
        model(torch.randn(1, 1, 16, 16), normals=torch.zeros(1))


def test_tokenizer_path_loads_saved_tokenizers(tmp_path):
    a, b = _model(), _model()
    path = tmp_path / "tok.pt"
    torch.save(a.tokenizers.state_dict(), path)
    c = _model(tokenizer_path=str(path))
    image = torch.randn(1, 1, 16, 16)
    assert torch.equal(c.tokenize(image)["rgb"], a.tokenize(image)["rgb"])
    assert not all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="tokenizer_path"):
        _model(tokenizer_path=str(tmp_path / "missing.pt"))
