"""The errors vitlab raises for bad input; the CLI prints them without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["CheckpointError", "ExportError", "TrainingDivergedError", "VitlabError", "did_you_mean"]


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``" Did you mean: a, b?"`` with the names closest to ``name``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=5, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


class VitlabError(Exception):
    """Base class of errors about user input that the command line reports as one clear message."""


class CheckpointError(VitlabError, ValueError):
    """A checkpoint or run directory that is missing, torn, or not vitlab's."""


class TrainingDivergedError(VitlabError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ExportError(VitlabError, RuntimeError):
    """A model that ONNX / ``torch.export`` cannot export, or whose exported graph does not run."""
