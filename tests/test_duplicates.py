"""The duplicate-code check is blocking (STYLE.md B.5): 8+ similar lines in src/ fail the suite."""

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "vitlab"


def test_no_duplicated_code_in_src():
    cmd = [
        sys.executable,
        "-m",
        "pylint",
        "--disable=all",
        "--enable=duplicate-code",
        "--min-similarity-lines=8",
        "--ignore-imports=yes",
        "--ignore-signatures=yes",
        "--score=no",
        str(SRC),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, "duplicated code (move it to layers/ or a shared helper):\n" + result.stdout
