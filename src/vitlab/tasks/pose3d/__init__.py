"""3-D human pose task models: ``multihmr`` (paper 35, one view, :mod:`.multihmr`) and ``mvp`` (paper 36, calibrated
views, :mod:`.mvp`); ``draw`` renders their skeletons for ``vitlab predict``."""

from .multihmr import MultiHMR, batch_from_humans
from .mvp import MvP, batch_from_humans_views

__all__ = ["MultiHMR", "MvP", "batch_from_humans", "batch_from_humans_views"]
