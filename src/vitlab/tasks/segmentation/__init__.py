"""Segmentation task models; importing this package registers them."""

from .eco_m2f import EcoM2F
from .semantic import IGNORE_INDEX, SemanticFuseHead, SemanticSegmentation
from .upernet import UperNetHead
from .vit_comer import ViTCoMer

__all__ = ["IGNORE_INDEX", "EcoM2F", "SemanticFuseHead", "SemanticSegmentation", "UperNetHead", "ViTCoMer"]
