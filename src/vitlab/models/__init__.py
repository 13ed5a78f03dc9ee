"""vitlab model families. Importing this module registers every family with timm.

One import line per family, explicit on purpose (an import error points at the file).
"""

# ruff: noqa: F401  (registration side effects)
from . import channel_vit
from . import ci2p_vit
from . import crossvit
from . import cvt
from . import duoformer
from . import fmvit
from . import hyena_vit
from . import maformer
from . import msvmamba
from . import ppma
from . import pvt_v2
from . import resformer
from . import s2aformer
from . import spectformer
from . import svt
from . import swin
from . import tic
from . import tiny_vit
from . import univitar
from . import vit
from . import vit_resnas
from . import vir
from ._factory import UnknownModelError, create_model, get_variant, list_models
from ._variants import VARIANTS, Paper, VariantSpec

__all__ = ["VARIANTS", "Paper", "UnknownModelError", "VariantSpec", "create_model", "get_variant", "list_models"]
