"""The engine's shape: short functions, and a loop that names no technique (techniques join through
``engine/techniques.py`` as objective wrappers or callbacks)."""

import ast
from pathlib import Path

import pytest

from vitlab.engine.config import RunConfig
from vitlab.engine.techniques import TECHNIQUES, validate_techniques

ENGINE = Path(__file__).resolve().parents[2] / "src" / "vitlab" / "engine"
TECHNIQUE_MODULES = {"hcs", "multires", "distill", "fast_distill", "reduce_train", "task_objective"}


def test_no_engine_function_is_longer_than_80_lines():
    long = []
    for path in ENGINE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


@pytest.mark.parametrize("name", ["loop.py", "train.py", "callbacks.py", "objective.py"])
def test_loop_and_builder_import_no_technique(name):
    tree = ast.parse((ENGINE / name).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}
    assert not imported & TECHNIQUE_MODULES, f"{name} imports {sorted(imported & TECHNIQUE_MODULES)}"


def test_every_technique_declares_a_flag_and_only_known_exclusions():
    flags = [t.flag for t in TECHNIQUES]
    assert len(flags) == len(set(flags))
    for t in TECHNIQUES:
        assert set(t.excludes) <= set(flags), (t.flag, t.excludes)


def test_exclusions_are_checked_in_both_orders():
    cfg = RunConfig()
    cfg.distillation.teacher, cfg.hcs.hcs = "vit_nano_patch4_28", True
    with pytest.raises(ValueError, match=r"--hcs .*cannot be combined with --teacher"):
        validate_techniques(cfg)
    cfg = RunConfig()
    cfg.reduction.reduce, cfg.multires.resolutions = "tome", "28,20"
    with pytest.raises(ValueError, match=r"--reduce .*cannot be combined with --resolutions"):
        validate_techniques(cfg)
    validate_techniques(RunConfig())  # nothing on: nothing to refuse
