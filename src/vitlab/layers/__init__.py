"""Reusable parts shared by vitlab's model families; imports only torch, timm.layers and layers/."""

from .embed import ConvEmbed

__all__ = ["ConvEmbed"]
