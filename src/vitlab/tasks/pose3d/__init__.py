"""3-D human pose task models: ``multihmr`` (paper 35, :mod:`.multihmr`)."""

from .multihmr import MultiHMR, batch_from_humans

__all__ = ["MultiHMR", "batch_from_humans"]
