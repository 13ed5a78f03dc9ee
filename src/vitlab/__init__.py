"""vitlab: the modern Vision Transformer literature, runnable on PyTorch and timm.

``import vitlab`` registers every vitlab model with timm, so ``timm.create_model`` builds them.
"""

from .models import UnknownModelError, create_model, get_variant, list_models
from .tasks import create_task_model, list_tasks

__version__ = "0.1.0"
__all__ = [
    "UnknownModelError",
    "__version__",
    "create_model",
    "create_task_model",
    "get_variant",
    "list_models",
    "list_tasks",
]
