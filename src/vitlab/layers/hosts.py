"""The host check shared by what works on an isotropic ViT's attention blocks (``compress.structured``,
``compress.attn_sparsity``, the ``modular_moe`` task's surgery): ``model.blocks`` is a non-empty
``nn.Sequential`` whose ``attn`` is timm's or vitlab's ``Attention`` (one ``qkv`` Linear, ``num_heads``,
``head_dim``, fused SDPA)."""

from __future__ import annotations

import torch.nn as nn
from timm.models.vision_transformer import Attention as TimmAttention

from .attention import Attention as VitlabAttention

__all__ = ["attention_blocks", "host_name"]

_ATTENTION_FORWARDS = (TimmAttention.forward, VitlabAttention.forward)


def host_name(model: nn.Module) -> str:
    """The architecture a model was built as (its timm name where it has one), for errors."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def attention_blocks(model: nn.Module, method: str, supported: str) -> list[nn.Module]:
    """``model.blocks`` as a list, or a ``ValueError`` "``method`` supports ``supported``; got ..."."""
    got = host_name(model)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise ValueError(f"{method} supports {supported}; got {got} (no non-empty 'blocks' Sequential)")
    for i, b in enumerate(blocks):
        attn = getattr(b, "attn", None)
        if getattr(type(attn), "forward", None) not in _ATTENTION_FORWARDS:
            raise ValueError(f"{method} supports {supported}; got {got}.blocks[{i}].attn = {type(attn).__name__}")
    return list(blocks)
