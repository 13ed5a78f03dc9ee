"""``fourm``: 4M, any-to-any masked modelling over discrete tokens of every modality.

Paper: Mizrahi, Bachmann, Kar et al., "4M: Massively Multimodal Masked Modeling", NeurIPS 2023 (arXiv:2312.06647);
official code apple/ml-4m. Implemented, at small scale on FMNIST-Scenes-3D (32 px):

1. Every modality as discrete tokens, from tokenizers trained first and then frozen (``layers.tokenizers``):
   ``rgb`` (the gray image) and ``depth`` (inverse depth ``near / d``, 0 for the sky) by FSQ conv autoencoders,
   ``semseg`` by an FSQ autoencoder over one-hot classes, each as an ``(img_size / 4)``-sided grid; ``caption``
   (class words in reading order) and ``boxes`` (class word + 4 coordinate tokens per item) by a word tokenizer,
   derived from the annotations (``fourm_parts.scene_words``).
2. The encoder-decoder: input embeddings = token embedding (per modality) + modality embedding + fixed sine-cosine
   position (2-D for grids, 1-D for sequences); the encoder is the blocks of an isotropic ViT by name run on the
   visible tokens; decoder queries are a mask token + modality + position embeddings of the targets, which
   self-attend (targets of different modalities do not attend to each other, ``decoder_mask``) and cross-attend to
   the encoder output; a linear head per modality.
3. Multimodal masking: per sample an input budget and a target budget are split across the available modalities by
   Dirichlet(``alpha``) shares (``masking="uniform"``: tokens drawn uniformly from all modalities, the ablation);
   inputs and targets are disjoint random tokens within each modality.
4. The loss is cross-entropy averaged per modality, then over modalities (``per_modality_loss``).
5. ``generate``: any-to-any inference by iterative unmasking (MaskGIT-style, cosine schedule, most confident tokens
   first); revealed tokens join the encoder's input.

``pair=(src, tgt)`` turns it into a single-pair model (inputs only from ``src``, targets only from ``tgt``, same
budgets: the same compute per step), the paper's baseline. ``forward`` takes the normalised image plus the scene's
``semantic``, ``depth``, ``boxes`` and ``labels`` (a modality missing from the batch is not available); it tokenizes
them and returns the targets' logits. ``forward_tokens`` does the same on token tensors (the benchmark pre-tokenizes).

Deviations: 4M's tokenizers are ViT VQ-VAEs at 224 px (14x14 tokens) and WordPiece; here small FSQ conv autoencoders
(8x8 tokens at 32 px) and a word vocabulary. Text targets are predicted like image tokens (masked, in parallel)
instead of 4M's autoregressive span decoding of sequences, and text inputs are random tokens instead of spans. 4M's
encoder has its own blocks (SwiGLU, no bias in 4M-21); here the host backbone's blocks (timm ViT or vitlab isotropic)
with a LayerNorm after them. The budgets are fixed numbers of tokens with one ``alpha`` for inputs and targets
(the official code can draw the budget from a range and set per-modality input and target alphas). Training scale:
minutes on a CPU, not 500 B tokens: large-scale results are not reproduced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ...data.fashion_mnist import FASHION_MNIST_CLASSES
from ...layers.pos_embed import sincos_2d_normalized
from ...layers.tokenizers import ImageTokenizer, WordTokenizer, train_tokenizer
from .._backbone import PlainViTTrunk
from .._registry import register_task
from ..base import TaskModel, TaskSpec
from .fourm_parts import (
    MASKINGS,
    MODALITIES,
    DecoderBlock,
    ModalitySpec,
    class_word,
    decoder_mask,
    iterative_unmask,
    per_modality_loss,
    random_scenes,
    sample_counts,
    scene_words,
    select_tokens,
    sincos_1d,
)

if TYPE_CHECKING:
    from torchmetrics import MetricCollection

__all__ = ["FourM"]

DENSE = ("rgb", "depth", "semseg")
TEST_KWARGS = {"img_size": 16, "levels": (3, 3), "semseg_levels": (3, 3), "tokenizer_hidden": 4, "bins": 4,
               "max_items": 2, "input_budget": 8, "target_budget": 8, "dec_depth": 1, "dec_heads": 2}  # fmt: skip
FAR = 80.0  # metres: inverse depth below near / FAR decodes to "no depth" (sky)


class FourM(TaskModel):
    """4M on scene modalities (module docstring).

    Args:
        modalities: a subset of ``MODALITIES`` ("rgb", "depth", "semseg", "caption", "boxes").
        input_budget, target_budget: encoder input tokens and decoder target tokens per sample.
        masking: "dirichlet" (4M) or "uniform"; ``alpha``: the Dirichlet concentration.
        pair: ``(src, tgt)`` for a single-pair model, else None (all-to-all).
        dec_depth, dec_heads, mlp_ratio: the decoder.
        levels, semseg_levels, tokenizer_hidden, downsample: the FSQ tokenizers (grid side
            ``img_size / 2**downsample``).
        bins, max_items: coordinate tokens per axis, items written per scene.
        depth_near: metres; depth is tokenized as ``near / depth`` (1 at ``near``, 0 for the sky).
        eval_seed: seed of the masks drawn in eval mode (so held-out losses are deterministic).
        tokenizer_path: a saved ``model.tokenizers.state_dict()`` (after ``fit_tokenizers``) to load.
        tokenizer_steps, tokenizer_scenes: ``vitlab train`` fits the tokenizers on this many training scenes for this
            many steps before training the model (``prepare_data``), unless ``tokenizer_path`` is given.
    """

    task_name = "fourm"
    batch_keys = ("image", "semantic", "depth", "boxes", "labels")
    target_keys = ()
    primary_metric = "mod_loss"
    higher_is_better = False

    def __init__(
        self,
        backbone: str = "vit_nano_patch4_28",
        *,
        num_classes: int = 11,
        in_chans: int = 1,
        img_size: int = 32,
        backbone_kwargs: dict[str, Any] | None = None,
        modalities: Sequence[str] = MODALITIES,
        input_budget: int = 48,
        target_budget: int = 48,
        masking: str = "dirichlet",
        alpha: float = 0.5,
        pair: Sequence[str] | None = None,
        dec_depth: int = 4,
        dec_heads: int = 4,
        mlp_ratio: float = 4.0,
        levels: Sequence[int] = (8, 5, 5),
        semseg_levels: Sequence[int] = (5, 5, 5),
        tokenizer_hidden: int = 32,
        downsample: int = 2,
        bins: int = 16,
        max_items: int = 4,
        depth_near: float = 2.0,
        eval_seed: int = 0,
        tokenizer_path: str | None = None,
        tokenizer_steps: int = 600,
        tokenizer_scenes: int = 2000,
    ) -> None:
        super().__init__(backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        self.modalities = tuple(modalities)
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be distinct names from {MODALITIES}, got {tuple(modalities)!r}")
        if pair is not None and (len(pair) != 2 or any(m not in self.modalities for m in pair)):
            raise ValueError(f"pair must be (source, target) modalities among {self.modalities}, got {pair!r}")
        if masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")
        if img_size % 2**downsample:
            raise ValueError(f"img_size {img_size} must be a multiple of the tokenizers' stride {2**downsample}")
        side = img_size // 2**downsample
        names = [class_word(c) for c in FASHION_MNIST_CLASSES] if num_classes == 11 else [
            f"class_{k}" for k in range(num_classes - 1)
        ]  # fmt: skip
        self.class_names, self.text = names, WordTokenizer(names, bins)
        self.tokenizers = nn.ModuleDict()
        for m, chans, kind, lv in (("rgb", in_chans, "regression", levels), ("depth", 1, "regression", levels),
                                   ("semseg", num_classes, "classes", semseg_levels)):  # fmt: skip
            if m in self.modalities:
                self.tokenizers[m] = ImageTokenizer(chans, kind=kind, levels=lv, hidden=tokenizer_hidden,
                                                    downsample=downsample)  # fmt: skip
        if tokenizer_path is not None:  # tokenizers.state_dict() saved after fit_tokenizers
            try:
                self.tokenizers.load_state_dict(torch.load(tokenizer_path, weights_only=True))
            except (OSError, RuntimeError) as err:
                raise ValueError(f"tokenizer_path {tokenizer_path!r}: not a saved state of these tokenizers") from err
        self.tokenizers.eval().requires_grad_(False)  # trained first (fit_tokenizers), then frozen
        self.fit_on_data = tokenizer_path is None and tokenizer_steps > 0
        self.tokenizer_steps, self.tokenizer_scenes = tokenizer_steps, tokenizer_scenes
        lengths = {"caption": max_items + 1, "boxes": 5 * max_items + 1}
        self.specs = [
            ModalitySpec(m, self.tokenizers[m].codebook_size, side * side, (side, side))
            if m in DENSE else ModalitySpec(m, len(self.text), lengths[m])
            for m in self.modalities
        ]  # fmt: skip
        self.lengths = [s.length for s in self.specs]
        self.pair = None if pair is None else (self.modalities.index(pair[0]), self.modalities.index(pair[1]))
        src_len = self.lengths[self.pair[0]] if self.pair else sum(self.lengths)
        tgt_len = self.lengths[self.pair[1]] if self.pair else sum(self.lengths)
        same = self.pair is None or self.pair[0] == self.pair[1]
        if input_budget > src_len or target_budget > tgt_len or (same and input_budget + target_budget > tgt_len):
            raise ValueError(
                f"input_budget {input_budget} + target_budget {target_budget} exceed the tokens there are "
                f"({dict(zip(self.modalities, self.lengths, strict=True))})"
            )
        for key, value in (("input_budget", input_budget), ("target_budget", target_budget)):
            if value < 1:
                raise ValueError(f"{key} must be >= 1 (an empty budget has nothing to learn from), got {value}")
        self.input_budget, self.target_budget, self.masking, self.alpha = input_budget, target_budget, masking, alpha
        self.max_items, self.depth_near, self.eval_seed = max_items, depth_near, eval_seed

        trunk = PlainViTTrunk(backbone, in_chans=in_chans, img_size=img_size, backbone_kwargs=backbone_kwargs)
        dim = self.embed_dim = trunk.embed_dim
        self._timm_blocks = trunk._timm
        self.blocks = trunk.backbone.blocks  # only the encoder blocks are kept (tokens come from the tokenizers)
        self.enc_norm, self.dec_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tok_embed = nn.ModuleDict({s.name: nn.Embedding(s.vocab, dim) for s in self.specs})
        self.mod_embed = nn.Parameter(torch.randn(len(self.specs), dim) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(dim) * 0.02)
        self.decoder = nn.ModuleList([DecoderBlock(dim, dec_heads, mlp_ratio) for _ in range(dec_depth)])
        self.heads = nn.ModuleDict({s.name: nn.Linear(dim, s.vocab) for s in self.specs})
        pos = [sincos_2d_normalized(s.grid, dim).flatten(0, 1) if s.grid else sincos_1d(s.length, dim)
               for s in self.specs]  # fmt: skip
        self.register_buffer("pos", torch.cat(pos), persistent=False)
        ids = torch.repeat_interleave(torch.arange(len(self.specs)), torch.tensor(self.lengths))
        self.register_buffer("mod_ids", ids, persistent=False)
        self.offsets = [0, *torch.tensor(self.lengths).cumsum(0).tolist()]

    def train(self, mode: bool = True) -> FourM:
        super().train(mode)
        self.tokenizers.eval()  # frozen: a VQ codebook must not move with the model's training mode
        return self

    # -- tokenizing ---------------------------------------------------------------------------------------------
    def depth_map(self, depth: torch.Tensor) -> torch.Tensor:
        """Depth ``(B, H, W)`` metres (0: none) -> the depth tokenizer's input ``(B, 1, H, W)`` in [0, 1]."""
        inv = torch.where(depth > 0, self.depth_near / depth.clamp(min=1e-6), torch.zeros_like(depth))
        return inv.clamp(max=1.0)[:, None]

    def map_depth(self, inv: torch.Tensor) -> torch.Tensor:
        """The inverse of ``depth_map``: ``(B, 1, H, W)`` -> depth ``(B, H, W)`` (0 where it reads as sky)."""
        inv = inv[:, 0]
        return torch.where(inv > self.depth_near / FAR, self.depth_near / inv.clamp(min=1e-6), torch.zeros_like(inv))

    def text_tokens(self, boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-scene boxes (pixel xyxy) and labels -> ``caption`` and ``boxes`` token rows ``(B, L)``."""
        caps, boxs = [], []
        for b, lab in zip(boxes, labels, strict=True):
            caption, box_words = scene_words(b, lab, self.class_names, self.text, self.img_size, self.max_items)
            caps.append(self.text.encode(caption, self.max_items + 1))
            boxs.append(self.text.encode(box_words, 5 * self.max_items + 1))
        return {"caption": torch.stack(caps), "boxes": torch.stack(boxs)}

    @torch.no_grad()
    def tokenize(self, image: torch.Tensor, **targets: Any) -> dict[str, torch.Tensor]:
        """The image and whichever of ``semantic``, ``depth``, ``boxes`` + ``labels`` are given -> tokens per modality
        (``(B, L)`` int64); a modality whose data is missing is left out."""
        raw = {"rgb": image, "semseg": targets.get("semantic"), "depth": targets.get("depth")}
        out = {}
        for m in DENSE:
            if m in self.modalities and raw[m] is not None:
                x = self.depth_map(raw[m]) if m == "depth" else raw[m]
                out[m] = self.tokenizers[m].encode(x).flatten(1)
        if targets.get("boxes") is not None and targets.get("labels") is not None:
            text = self.text_tokens(targets["boxes"], targets["labels"])
            out.update({m: t.to(image.device) for m, t in text.items() if m in self.modalities})
        return out

    @torch.no_grad()
    def detokenize(self, modality: str, tokens: torch.Tensor) -> Any:
        """Tokens ``(B, L)`` -> the map (rgb ``(B, C, H, W)``, depth ``(B, H, W)``, semseg ``(B, H, W)``) or words."""
        spec = self._spec(modality)
        if spec.grid is None:
            return [self.text.decode(row) for row in tokens]
        out = self.tokenizers[modality].decode(tokens.view(-1, *spec.grid))
        return self.map_depth(out) if modality == "depth" else out

    def fit_tokenizers(self, data: Mapping[str, torch.Tensor], steps: int, batch: int = 64, seed: int = 0) -> dict:
        """Train the dense tokenizers on ``data`` (``image`` normalised, ``semantic``, ``depth``), then freeze them.
        Returns each one's final loss."""
        raw = {"rgb": data.get("image"), "semseg": data.get("semantic"), "depth": data.get("depth")}
        final = {}
        for m, tok in self.tokenizers.items():
            if raw[m] is None:
                raise ValueError(f"fit_tokenizers needs the data of modality {m!r}; got keys {sorted(data)}")
            x = self.depth_map(raw[m]) if m == "depth" else raw[m]
            final[m] = train_tokenizer(tok, x, steps, batch=batch, seed=seed)[-1]
        self.tokenizers.eval().requires_grad_(False)
        return final

    def prepare_data(self, dataset: Any) -> None:
        """``vitlab train``'s first step: fit the tokenizers on the first ``tokenizer_scenes`` training scenes (an
        engine scene set: uint8 ``image`` normalised with its ``mean``/``std``, ``semantic``, ``depth``)."""
        if not self.fit_on_data:
            return
        items = [dataset[i] for i in range(min(len(dataset), self.tokenizer_scenes))]
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (dataset.mean, dataset.std))
        image = (torch.stack([s["image"] for s in items]).float() / 255 - mean) / std
        data = {"image": image, **{k: torch.stack([s[k] for s in items]) for k in ("semantic", "depth")}}
        device = next(self.parameters()).device
        self.fit_tokenizers({k: v.to(device) for k, v in data.items()}, self.tokenizer_steps)

    def _spec(self, modality: str) -> ModalitySpec:
        if modality not in self.modalities:
            raise ValueError(f"unknown modality {modality!r}: this model has {self.modalities}")
        return self.specs[self.modalities.index(modality)]

    # -- the encoder-decoder ------------------------------------------------------------------------------------
    def _embed_all(self, tokens: Mapping[str, torch.Tensor], B: int) -> torch.Tensor:
        """Every token of every modality embedded ``(B, T, D)`` (absent modalities as token 0: never selected)."""
        rows = []
        for s in self.specs:
            t = tokens.get(s.name)
            t = t if t is not None else torch.zeros(B, s.length, dtype=torch.long, device=self.pos.device)
            if t.shape != (B, s.length) or t.dtype != torch.long:
                raise ValueError(f"{s.name} tokens must be int64 ({B}, {s.length}), got {t.dtype} {tuple(t.shape)}")
            rows.append(self.tok_embed[s.name](t))
        return torch.cat(rows, 1) + self.mod_embed[self.mod_ids] + self.pos

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:  # a token set, not a patch grid: vitlab blocks get a (1, N) "grid"
            x = block(x) if self._timm_blocks else block(x, (1, x.shape[1]))
        return self.enc_norm(x)

    def _decode(self, context: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        mods = self.mod_ids[target_idx]
        q = self.mask_token + self.mod_embed[mods] + self.pos[target_idx]
        mask = decoder_mask(mods)
        for block in self.decoder:
            q = block(q, context, mask)
        return self.dec_norm(q)

    def _draw_masks(self, available: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        caps = available.long() * torch.tensor(self.lengths, device=available.device)
        caps_in, caps_tgt = caps.clone(), caps.clone()
        if self.pair is not None:
            keep_in, keep_tgt = torch.zeros_like(caps), torch.zeros_like(caps)
            keep_in[:, self.pair[0]], keep_tgt[:, self.pair[1]] = 1, 1
            caps_in, caps_tgt = caps * keep_in, caps * keep_tgt
        n_in = sample_counts(caps_in.cpu(), self.input_budget, self.masking, self.alpha, "input")
        n_tgt = sample_counts((caps_tgt.cpu() - n_in).clamp(min=0), self.target_budget, self.masking, self.alpha,
                              "target")  # fmt: skip
        idx_in, idx_tgt = select_tokens(n_in, n_tgt, self.lengths)
        return idx_in.to(available.device), idx_tgt.to(available.device)

    def forward_tokens(
        self, tokens: Mapping[str, torch.Tensor], available: torch.Tensor | None = None
    ) -> dict[str, list[torch.Tensor]]:
        """Tokens per modality -> ``{"logits": [(n_m, V_m) per modality], "targets": [(n_m,)]}`` for one random
        input/target split (fixed by ``eval_seed`` in eval mode). ``available`` ``(B, M)`` bool; default: the
        modalities present in ``tokens``."""
        extra = [m for m in tokens if m not in self.modalities]
        if extra:
            raise ValueError(f"unknown modality {extra[0]!r}: this model has {self.modalities}")
        B = next(iter(tokens.values())).shape[0]
        device = self.pos.device
        if available is None:
            available = torch.tensor([m in tokens for m in self.modalities], device=device).expand(B, -1)
        if self.training:
            idx_in, idx_tgt = self._draw_masks(available)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.eval_seed)
                idx_in, idx_tgt = self._draw_masks(available)
        full = self._embed_all(tokens, B)
        context = self._encode(torch.gather(full, 1, idx_in[..., None].expand(-1, -1, full.shape[-1])))
        h = self._decode(context, idx_tgt)
        flat = torch.cat([tokens.get(s.name, torch.zeros(B, s.length, dtype=torch.long, device=device))
                          for s in self.specs], 1)  # fmt: skip
        target_tokens, mods = torch.gather(flat, 1, idx_tgt), self.mod_ids[idx_tgt]
        logits, targets = [], []
        for m, s in enumerate(self.specs):
            sel = mods == m
            logits.append(self.heads[s.name](h[sel]))
            targets.append(target_tokens[sel])
        return {"logits": logits, "targets": targets}

    def forward(self, batch_or_image: torch.Tensor | Mapping[str, Any], **targets: Any) -> dict[str, list]:
        """The normalised image plus the scene's ``semantic``, ``depth``, ``boxes``, ``labels`` (or a batch dict)."""
        image = batch_or_image
        if isinstance(image, Mapping):
            if "image" not in image:
                raise ValueError(f"batch has no 'image' (keys: {sorted(image)})")
            targets = {**self.forward_kwargs(image), **targets}
            image = image["image"]
        unknown = [k for k in targets if k not in self.batch_keys]
        if unknown:
            raise ValueError(f"unknown inputs {unknown}: fourm takes {self.batch_keys}")
        self.check_image(image)
        return self.forward_image(image, **targets)

    def forward_kwargs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: batch[k] for k in self.batch_keys[1:] if k in batch}

    def forward_image(self, image: torch.Tensor, **targets: Any) -> dict[str, list]:
        if tuple(image.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"image must be {self.img_size}x{self.img_size} px, got {tuple(image.shape[-2:])}")
        return self.forward_tokens(self.tokenize(image, **targets))

    def loss(self, output: Mapping[str, list], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``{"loss": per-modality averaged cross-entropy, "loss_<modality>": each}``."""
        loss, per = per_modality_loss(output["logits"], output["targets"])
        return {"loss": loss, **{f"loss_{s.name}": v.detach() for s, v in zip(self.specs, per, strict=True)}}

    # -- any-to-any generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, tokens: Mapping[str, torch.Tensor], target: str, steps: int = 1, temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Predict all tokens ``(B, L)`` of ``target`` from the given modalities' tokens by iterative unmasking:
        ``steps`` rounds; each reveals the most confident predictions (cosine schedule, all by the last round) and
        feeds them to the encoder. ``temperature`` 0: argmax, else sampled (with ``generator``)."""
        spec = self._spec(target)
        sources = [m for m in tokens if m != target]
        for m in sources:
            self._spec(m)
        if not sources:
            raise ValueError(f"generate needs at least one source modality besides {target!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= spec.length:
            raise ValueError(f"steps must be an integer in [1, {spec.length}], got {steps!r}")
        B, device = next(iter(tokens.values())).shape[0], self.pos.device
        m_t = self.modalities.index(target)
        src_idx = torch.cat([torch.arange(self.offsets[k], self.offsets[k + 1])
                             for k in map(self.modalities.index, sources)]).to(device)  # fmt: skip

        def predict(out: torch.Tensor, known: torch.Tensor, unknown: torch.Tensor) -> torch.Tensor:
            full = self._embed_all({**tokens, target: out}, B)
            idx_in = torch.cat([src_idx.expand(B, -1), known + self.offsets[m_t]], 1)
            context = self._encode(torch.gather(full, 1, idx_in[..., None].expand(-1, -1, full.shape[-1])))
            return self.heads[target](self._decode(context, unknown + self.offsets[m_t]))

        return iterative_unmask(predict, B, spec.length, steps, temperature, generator, device)

    # -- metrics ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_maps(self, image: torch.Tensor, steps: int = 4) -> dict[str, torch.Tensor]:
        """``vitlab predict`` on an image: RGB tokens -> ``semantic`` (B, H, W) class ids and ``depth`` (B, H, W)
        metres, each by ``steps`` rounds of iterative unmasking (for the modalities this model has)."""
        known = {"rgb": self.tokenize(image)["rgb"]}
        maps = {"semantic": "semseg", "depth": "depth"}
        return {
            k: self.detokenize(m, self.generate(known, m, steps=steps)) for k, m in maps.items() if m in self.modalities
        }

    def build_metrics(self) -> MetricCollection:
        from torchmetrics import MeanMetric, MetricCollection

        return MetricCollection({"mod_loss": MeanMetric(), "token_acc": MeanMetric()})

    def update_metrics(self, metrics: MetricCollection, output: Any, batch: Mapping[str, Any]) -> None:
        loss, _ = per_modality_loss(output["logits"], output["targets"])
        metrics["mod_loss"].update(loss.detach())
        hits = [(lg.argmax(-1) == t).float() for lg, t in zip(output["logits"], output["targets"], strict=True)]
        metrics["token_acc"].update(torch.cat(hits).mean() * 100)

    def summarize_metrics(self, metrics: MetricCollection) -> dict[str, float | list]:
        """``{"mod_loss": held-out per-modality loss (fixed masks), "token_acc": masked-token accuracy %}``."""
        return {k: float(metrics[k].compute()) for k in ("mod_loss", "token_acc")}

    def postprocess(self, output: Mapping[str, list]) -> dict[str, torch.Tensor]:
        """``{"<modality>_tokens": the predicted ids of that modality's target tokens}``."""
        return {f"{s.name}_tokens": lg.argmax(-1) for s, lg in zip(self.specs, output["logits"], strict=True)}

    def example_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Random images, semantic maps, depths (2-8 m) and two boxes per scene (deterministic for a ``generator``)."""
        return random_scenes(batch_size, self.img_size, self.in_chans, self.num_classes, generator)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, modalities={self.modalities}, masking={self.masking!r}, pair={self.pair}"


register_task(
    TaskSpec(
        name="fourm",
        task="generation",
        builder=FourM,
        metric="mod_loss",
        higher_is_better=False,
        kind="C",
        dataset="fmnist_scenes_3d",
        num_classes=11,
        in_chans=1,
        img_size=32,
        default_backbone="vit_nano_patch4_28",
        backbones="isotropic",
        backbones_reason="the encoder runs the backbone's blocks on a set of visible tokens of mixed modalities, "
        "which has no patch grid for a hierarchical model to pool",
        exportable=False,
        export_reason="random multimodal masks drawn per call (Python-side budget splitting) and list outputs",
        description="4M: every modality as discrete tokens (FSQ tokenizers, word tokens), Dirichlet input/target "
        "budgets, encoder-decoder with per-modality decoder masks, iterative unmasking (any-to-any)",
        test_backbones=("vit_micro_patch4_28", "vir_nano_patch4_28"),
        test_kwargs=TEST_KWARGS,
    )
)
