"""Multi-view task models (paper 37, feed-forward pointmaps): ``dust3r`` (two views -> both pointmaps in view 1's
frame), ``vggt`` (V frames -> camera pose encodings, depths, pointmaps in frame 1's frame). Shared objectives and
metrics live in :mod:`.geometry`; cameras follow :mod:`vitlab.layers.camera`."""

from . import geometry
from .dust3r import Dust3R, pairs_from_render3d
from .global_align import Alignment, reconstruct  # the module stays reachable as .global_align, like .geometry
from .ucpe import UCPENovelView
from .vggt import VGGT, frames_from_render3d

__all__ = ["VGGT", "Alignment", "Dust3R", "UCPENovelView", "frames_from_render3d", "geometry", "global_align",
           "pairs_from_render3d", "reconstruct"]  # fmt: skip
