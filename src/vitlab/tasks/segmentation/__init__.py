"""Segmentation task models; importing this package registers them."""

from .semantic import IGNORE_INDEX, SemanticFuseHead, SemanticSegmentation

__all__ = ["IGNORE_INDEX", "SemanticFuseHead", "SemanticSegmentation"]
