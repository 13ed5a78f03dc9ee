"""The duplicate-code check is blocking (STYLE.md B.5): 8+ similar lines in src/ fail the suite.

pylint's similarity checker run on its own (``symilar``, the options pylint's ``duplicate-code`` uses: comments,
docstrings, imports and signatures ignored): the same report without parsing every module, ~3x faster."""

import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "vitlab"
OPTIONS = ["-d", "8", "--ignore-comments", "--ignore-docstrings", "--ignore-imports", "--ignore-signatures"]


def duplicated_lines(files: list[Path]) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pylint.checkers.symilar", *OPTIONS, *map(str, files)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    total = re.search(r"TOTAL lines=\d+ duplicates=(\d+)", result.stdout)
    assert result.returncode == 0, f"symilar failed:\n{result.stdout}\n{result.stderr}"
    assert total, f"symilar printed no TOTAL line:\n{result.stdout}"
    return int(total.group(1)), result.stdout


def test_no_duplicated_code_in_src():
    count, report = duplicated_lines(sorted(SRC.rglob("*.py")))
    assert count == 0, "duplicated code (move it to layers/ or a shared helper):\n" + report


def test_the_check_finds_a_copied_block(tmp_path):
    body = "".join(f"    x{i} = a * {i} + b - {i} * c\n" for i in range(9))
    for name in ("one", "two"):  # different names, docstrings and comments: ignored, as in pylint
        head = f'def {name}(a, b, c):\n    """{name}."""\n    # {name}\n'
        (tmp_path / f"{name}.py").write_text(f"{head}{body}    return x8\n")
    count, _ = duplicated_lines([tmp_path / "one.py", tmp_path / "two.py"])
    assert count >= 8
