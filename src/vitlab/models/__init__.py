"""vitlab model families. Importing this module registers every family with timm."""

from . import crossvit, cvt, swin, tiny_vit, vit  # noqa: F401  (registration side effects, explicit on purpose)
from ._factory import UnknownModelError, create_model, get_variant, list_models
from ._variants import VARIANTS, Paper, VariantSpec

__all__ = ["VARIANTS", "Paper", "UnknownModelError", "VariantSpec", "create_model", "get_variant", "list_models"]
