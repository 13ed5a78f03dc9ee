"""Driving task models: LeTFuser (paper 38) on the driving world of ``data/synthetic/driving.py``."""

from .letfuser import LeTFuser, driving_adapter
from .letfuser_parts import GradNorm, GRUWaypointDecoder, SemanticDepthCloud

__all__ = ["GRUWaypointDecoder", "GradNorm", "LeTFuser", "SemanticDepthCloud", "driving_adapter"]
