"""docs/models.md and src/vitlab/paper_status.toml: up to date, complete, and malformed status files rejected."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from vitlab.models import Paper, VariantSpec

ROOT = Path(__file__).resolve().parents[1]


def _load_tool():
    path = ROOT / "tools" / "make_models_doc.py"
    spec = importlib.util.spec_from_file_location("make_models_doc", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


doc = _load_tool()


def _row(number: int, **overrides) -> dict:
    row = {"number": number, "title": f"Paper {number}", "arxiv": "", "kind": "B", "status": "missing"}
    row.update(reference="-", verified="", issue="", notes="")
    return {**row, **overrides}


def _write(path: Path, rows: list[dict]) -> Path:
    """Serialise rows as [[paper]] tables (JSON strings and integers are valid TOML values)."""
    chunks = ["[[paper]]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in row.items()) for row in rows]
    path.write_text("\n".join(chunks), encoding="utf-8")
    return path


def _valid_rows() -> list[dict]:
    return [_row(n) for n in range(doc.NUM_PAPERS)]


def test_models_doc_is_up_to_date():
    expected = doc.render()
    actual = doc.DOC_PATH.read_text(encoding="utf-8") if doc.DOC_PATH.exists() else ""
    assert actual == expected, "docs/models.md is stale: run `python tools/make_models_doc.py`"


def test_render_is_deterministic():
    assert doc.render() == doc.render()


def test_status_file_has_every_row_once():
    status = doc.load_status()
    assert list(status) == list(range(doc.NUM_PAPERS))
    assert {row.status for row in status.values()} <= set(doc.STATUSES)
    assert all(row.title for row in status.values())


def test_every_row_names_where_its_reference_figures_come_from():
    for row in doc.load_status().values():
        if row.status == "missing":
            assert row.reference_kind in (*doc.REFERENCE_KINDS, doc.NO_REFERENCE), row.number
        else:
            assert row.reference_kind in doc.REFERENCE_KINDS, f"row #{row.number}: {row.reference!r}"
            assert row.reference_source, f"row #{row.number} names no source for its reference figures"


def test_rows_stay_short():
    for row in doc.load_status().values():
        for key, limit in doc.MAX_CHARS.items():
            assert len(getattr(row, key)) <= limit, f"row #{row.number}: {key} is longer than {limit} characters"


def test_reference_is_its_own_column():
    text = doc.render()
    assert "| status | reference figures | verified / notes |" in text
    assert "**reconstructed**<br>" in text
    assert "Reference figures: " in text


def test_every_registered_model_has_a_paper_row():
    grouped = doc.group_models(doc.load_status(), doc.registry_variants())
    assert sorted(name for names in grouped.values() for name in names) == sorted(doc.registry_variants())


def test_synthetic_valid_file_loads(tmp_path):
    status = doc.load_status(_write(tmp_path / "ok.toml", _valid_rows()))
    assert len(status) == doc.NUM_PAPERS
    assert status[0].issue is None


def test_bad_status_is_rejected(tmp_path):
    rows = _valid_rows()
    rows[5]["status"] = "done"
    with pytest.raises(doc.StatusError, match="invalid status 'done'"):
        doc.load_status(_write(tmp_path / "bad.toml", rows))


def test_missing_row_is_rejected(tmp_path):
    rows = [row for row in _valid_rows() if row["number"] != 17]
    with pytest.raises(doc.StatusError, match=r"missing row\(s\) for paper number\(s\) 17"):
        doc.load_status(_write(tmp_path / "short.toml", rows))


def test_duplicate_row_is_rejected(tmp_path):
    rows = [*_valid_rows(), _row(3)]
    with pytest.raises(doc.StatusError, match="duplicate row for paper number 3"):
        doc.load_status(_write(tmp_path / "dup.toml", rows))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kind": "X"}, "invalid kind"),
        ({"arxiv": "arXiv:2103.14030"}, "arxiv must be an id"),
        ({"issue": 0}, "issue must be a positive issue number"),
        ({"status": "partial"}, "does not say how it was verified"),
        ({"verified": "by hand"}, "'verified' is filled in"),
        ({"stauts": "missing"}, "unknown field 'stauts'"),
        ({"status": "works", "verified": "by hand", "reference": "-"}, "reference is '-'"),
        ({"status": "works", "verified": "by hand", "reference": "guessed: from memory"}, "invalid reference"),
        ({"status": "works", "verified": "by hand", "reference": "reconstructed"}, "names no source"),
        ({"notes": "x" * 401}, "notes has 401 characters, more than 400"),
        ({"status": "works", "verified": "y" * 401, "reference": "paper table: Table 1"}, "verified has 401"),
    ],
)
def test_bad_fields_are_rejected(tmp_path, overrides, message):
    rows = _valid_rows()
    rows[2].update(overrides)
    with pytest.raises(doc.StatusError, match=message):
        doc.load_status(_write(tmp_path / "fields.toml", rows))


def test_row_without_reference_is_rejected(tmp_path):
    rows = _valid_rows()
    del rows[7]["reference"]
    with pytest.raises(doc.StatusError, match="missing field 'reference'"):
        doc.load_status(_write(tmp_path / "noref.toml", rows))


def test_old_long_rows_are_rejected(tmp_path):
    # The pre-split rows ran to 2,000 characters of notes with measured speeds inline.
    rows = _valid_rows()
    rows[4].update(status="works", verified="tests", reference="paper table: Table 1", notes="speed " * 100)
    with pytest.raises(doc.StatusError, match="keep the essentials"):
        doc.load_status(_write(tmp_path / "long.toml", rows))


def test_missing_row_with_registered_models_is_rejected(tmp_path):
    rows = _valid_rows()  # every row "missing", yet ViT/DeiT and TinyViT models are registered
    rows[4]["kind"] = "B+T"
    with pytest.raises(doc.StatusError, match="row #0 says 'missing' but models are registered"):
        doc.render(_write(tmp_path / "stale.toml", rows))


def test_model_for_unknown_paper_is_rejected():
    status = doc.load_status()
    stray = VariantSpec(Paper(99, "Not in PAPERS.md", "", ""))
    with pytest.raises(doc.StatusError, match="registered for paper #99, which has no status row"):
        doc.group_models(status, {"stray_model": stray})


def test_check_mode_flags_a_stale_file(tmp_path, capsys):
    out = tmp_path / "models.md"
    out.write_text("stale\n", encoding="utf-8")
    assert doc.main(["--check", "--output", str(out)]) == 1
    assert "make_models_doc.py" in capsys.readouterr().err
    assert doc.main(["--output", str(out)]) == 0
    assert doc.main(["--check", "--output", str(out)]) == 0
