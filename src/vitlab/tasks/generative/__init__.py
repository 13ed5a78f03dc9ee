"""Generative task models: ``flow``: ``flow_dit``, a small DiT trained by flow matching (issue 19's shared trainer).

Later generative components (adapters on this DiT) build on ``FlowDiT``; its adaLN-Zero blocks are ``model.blocks``.
"""

from .flow import FlowDiT
from .fourm import FourM  # noqa: F401  (registers "fourm")
from .modular_cam import ModularCam  # noqa: F401  (registers "modular_cam")
from .mv_adapter import MVAdapter  # noqa: F401  (registers "mv_adapter")

__all__ = ["FlowDiT"]
