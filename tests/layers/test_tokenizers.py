"""Discrete tokenizers (layers/tokenizers.py): FSQ/VQ code round trips, class maps, training, the word tokenizer."""

import pytest
import torch

from vitlab.layers.tokenizers import ImageTokenizer, WordTokenizer, train_tokenizer


def test_fsq_codes_vectors_round_trip_is_exact():
    torch.manual_seed(0)
    tok = ImageTokenizer(1, levels=(5, 4, 3), hidden=8).eval()
    assert tok.codebook_size == 60
    codes = torch.randint(0, 60, (2, 8, 8))
    vectors = tok.codes_to_vectors(codes)
    assert vectors.shape == (2, 3, 8, 8)
    assert torch.equal(tok.vectors_to_codes(vectors), codes)
    # encode lands on those grid points: the latents of encoded codes re-quantise to the same codes
    image = torch.randn(2, 1, 32, 32)
    enc = tok.encode(image)
    assert enc.shape == (2, 8, 8)
    assert enc.dtype == torch.long
    assert torch.equal(tok.vectors_to_codes(tok.codes_to_vectors(enc)), enc)
    assert tok.decode(enc).shape == (2, 1, 32, 32)


def test_vq_codes_vectors_round_trip():
    torch.manual_seed(0)
    tok = ImageTokenizer(1, quantizer="vq", codebook_size=16, levels=(3, 3, 3, 3), hidden=8).eval()
    codes = torch.randint(0, 16, (2, 4, 4))
    assert torch.equal(tok.vectors_to_codes(tok.codes_to_vectors(codes)), codes)
    assert tok.encode(torch.randn(2, 1, 16, 16)).max() < 16


def test_class_map_tokenizer_decodes_class_ids_and_checks_input():
    tok = ImageTokenizer(5, kind="classes", levels=(3, 3), hidden=8, downsample=1).eval()
    ids = torch.randint(0, 5, (2, 8, 8))
    codes = tok.encode(ids)
    assert codes.shape == (2, 4, 4)
    out = tok.decode(codes)
    assert out.shape == (2, 8, 8)
    assert out.dtype == torch.long
    assert int(out.max()) < 5
    with pytest.raises(ValueError, match="int64"):
        tok.encode(ids.float())
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 5\)"):
        tok.encode(ids + 5)
    with pytest.raises(ValueError, match="codes must lie"):
        tok.decode(torch.full((1, 4, 4), 9))


def test_bad_tokenizer_arguments_are_named():
    with pytest.raises(ValueError, match="levels"):
        ImageTokenizer(1, levels=(2, 4))
    with pytest.raises(ValueError, match="kind"):
        ImageTokenizer(1, kind="audio")
    with pytest.raises(ValueError, match="quantizer"):
        ImageTokenizer(1, quantizer="rq")
    with pytest.raises(ValueError, match="multiples of 4"):
        ImageTokenizer(1, levels=(3, 3)).encode(torch.randn(1, 1, 10, 10))


def test_train_tokenizer_lowers_the_loss_and_freezes():
    torch.manual_seed(0)
    # two-tone maps: a learnable structure
    data = (torch.rand(32, 1, 1, 1) > 0.5).float().expand(32, 1, 8, 8).contiguous()
    tok = ImageTokenizer(1, levels=(5, 5), hidden=8, downsample=1)
    losses = train_tokenizer(tok, data, steps=30, batch=8, lr=1e-2)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5
    assert not tok.training
    assert not any(p.requires_grad for p in tok.parameters())


def test_word_tokenizer_round_trip_and_coordinates():
    text = WordTokenizer(["bag", "coat", "ankle_boot"], bins=8)
    assert len(text) == 2 + 3 + 8
    words = ["coat", text.coord_word(3.0, 32), text.coord_word(31.9, 32), "bag", "<loc_0>"]
    ids = text.encode(words, 8)
    assert ids.tolist()[5:] == [1, 0, 0]  # <eos> then padding
    assert text.decode(ids) == words
    assert words[1] == "<loc_0>"
    assert words[2] == "<loc_7>"
    assert text.coord_value("<loc_2>", 32) == pytest.approx(10.0)  # the cell [8, 12)'s centre
    with pytest.raises(ValueError, match="not in the vocabulary"):
        text.encode(["sock"], 4)
    with pytest.raises(ValueError, match="do not fit"):
        text.encode(["bag"] * 4, 4)
    with pytest.raises(ValueError, match="distinct"):
        WordTokenizer(["bag", "bag"])
    with pytest.raises(ValueError, match="coordinate token"):
        text.coord_value("bag", 32)
