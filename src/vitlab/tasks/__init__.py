"""Task models (kinds H and C): a backbone by name, a neck and a head, with their own registry.

``create_task_model(name, backbone=...)`` builds one; ``list_tasks()`` names them. Each task model is a
``TaskModel`` (the interface the engine calls) described by a ``TaskSpec`` row. One folder per task; importing
this package registers every task model.
"""

from . import detection, driving, generative, multitask, multiview, pose3d, segmentation, video
from ._backbone import BackbonePyramid, create_backbone, feature_dicts
from ._registry import TASKS, UnknownTaskError, create_task_model, get_task, list_tasks, register_task
from .base import TaskModel, TaskSpec

__all__ = [
    "TASKS",
    "BackbonePyramid",
    "TaskModel",
    "TaskSpec",
    "UnknownTaskError",
    "create_backbone",
    "create_task_model",
    "detection",
    "driving",
    "feature_dicts",
    "generative",
    "get_task",
    "list_tasks",
    "multitask",
    "multiview",
    "pose3d",
    "register_task",
    "segmentation",
    "video",
]
