"""Multi-task models trained on heterogeneous data; importing this package registers them."""

from .modular_moe import DEFAULT_TASKS, ModularMoE, TaskHead, parse_tasks

__all__ = ["DEFAULT_TASKS", "ModularMoE", "TaskHead", "parse_tasks"]
