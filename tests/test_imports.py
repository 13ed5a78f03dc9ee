"""Package structure: import arrows point one way (cli -> engine -> bench/reduce/tasks/compress -> models ->
layers; engine trains with the reduce/ and compress/ plug-ins and the task models, none of which imports engine;
only cli may import everything), and ``import vitlab`` registers every family with timm."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vitlab"
# a package may import only the packages listed for it (besides itself)
ALLOWED = {
    "layers": set(),
    "models": {"layers"},
    "data": {"layers"},  # render3d casts its rays with layers.camera (DESIGN: data -> models -> layers)
    "bench": {"models", "layers", "data"},
    "engine": {"models", "layers", "data", "bench", "reduce", "tasks", "compress", "search"},
    "reduce": {"models", "layers"},
    "compress": {"models", "layers"},
    "tasks": {"models", "layers", "data"},
    "search": {"models", "layers"},  # ViT-ResNAS supernet and evolutionary search
}
TOP_LEVEL_SHARED = {"errors", "__init__"}  # vitlab/errors.py and the version are importable from anywhere
PACKAGES = {p.name for p in SRC.iterdir() if p.is_dir() and p.name.isidentifier() and any(p.rglob("*.py"))}
TOP_LEVEL = PACKAGES | ({p.stem for p in SRC.glob("*.py")} - {"__main__"})  # what vitlab/cli.py may import


def _vitlab_imports(path: Path) -> set[str]:
    """The top-level vitlab names (packages, modules, ``__init__``) that ``path`` imports, its own excepted."""
    parts = path.relative_to(SRC).with_suffix("").parts
    package = parts[:-1]  # () for vitlab/cli.py, ("engine",) for vitlab/engine/train.py
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module == "vitlab" or (node.module or "").startswith("vitlab.")):
                    continue
                target = node.module.split(".")[1:]
            else:  # from ..x import y: climb level - 1 packages from this file's own
                target = [*package[: len(package) - node.level + 1], *(node.module or "").split(".")]
                target = [t for t in target if t]
            if target:
                found.add(target[0])
            else:  # from vitlab import x / from . import x (at the top): x is a module or a name of __init__
                found |= {a.name if a.name in TOP_LEVEL else "__init__" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vitlab.")}
    found.discard(parts[0])
    return found


@pytest.mark.parametrize("pkg", sorted(p.name for p in SRC.iterdir() if p.is_dir() and p.name in ALLOWED))
def test_import_direction(pkg):
    for path in (SRC / pkg).rglob("*.py"):
        bad = _vitlab_imports(path) - ALLOWED[pkg] - TOP_LEVEL_SHARED
        assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}; {pkg}/ may import only {sorted(ALLOWED[pkg])}"


def test_every_package_has_a_rule():
    assert not PACKAGES - set(ALLOWED), f"add {sorted(PACKAGES - set(ALLOWED))} to ALLOWED"


def test_cli_may_import_everything_and_nothing_imports_it():
    # cli.py sits on top of every arrow: it may import any package, and only vitlab/__main__.py imports it.
    used = _vitlab_imports(SRC / "cli.py")
    assert used <= TOP_LEVEL, f"cli.py imports unknown vitlab names {sorted(used - TOP_LEVEL)}"
    for path in SRC.rglob("*.py"):
        if path.parent == SRC and path.stem in {"cli", "__main__"}:
            continue
        assert "cli" not in _vitlab_imports(path), f"{path.relative_to(SRC)} imports vitlab.cli"


def test_model_files_do_not_import_each_other():
    for path in (SRC / "models").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and path.name != "__init__.py":
                assert node.module.startswith("_"), f"models/{path.name} imports models/{node.module}"


def test_import_registers_with_timm_in_a_fresh_process():
    code = "import timm, vitlab; names = vitlab.list_models(); assert names and all(timm.is_model(n) for n in names)"
    subprocess.run([sys.executable, "-c", code], check=True)
