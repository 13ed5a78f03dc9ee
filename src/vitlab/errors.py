"""The errors vitlab raises for bad input; the CLI prints them without a traceback."""

from __future__ import annotations

__all__ = ["CheckpointError", "ExportError", "TrainingDivergedError", "VitlabError"]


class VitlabError(Exception):
    """Base class of errors about user input that the command line reports as one clear message."""


class CheckpointError(VitlabError, ValueError):
    """A checkpoint or run directory that is missing, torn, or not vitlab's."""


class TrainingDivergedError(VitlabError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ExportError(VitlabError, RuntimeError):
    """A model that ONNX / ``torch.export`` cannot export, or whose exported graph does not run."""
