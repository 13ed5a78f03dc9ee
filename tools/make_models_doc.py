"""Generate ``docs/models.md`` from vitlab's model registry and ``src/vitlab/paper_status.toml``.

    python tools/make_models_doc.py            # rewrite docs/models.md
    python tools/make_models_doc.py --check    # exit 1 when docs/models.md is out of date

The registry says which models exist (``vitlab.list_models()``, each tied to a PAPERS.md row by
``get_variant(name).paper.number``); the status file says how far each paper is (``status``: what runs and
is verified) and, separately, where its reference figures come from (``reference``). The two must agree,
and anything inconsistent stops the generator with a message naming the row or model.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "DOC_PATH",
    "MAX_CHARS",
    "NUM_PAPERS",
    "REFERENCE_KINDS",
    "STATUSES",
    "STATUS_PATH",
    "PaperStatus",
    "StatusError",
    "group_models",
    "load_status",
    "main",
    "registry_variants",
    "render",
]

ROOT = Path(__file__).resolve().parents[1]
STATUS_PATH = ROOT / "src" / "vitlab" / "paper_status.toml"  # package data: `vitlab info` reads it too
DOC_PATH = ROOT / "docs" / "models.md"
NUM_PAPERS = 44  # PAPERS.md rows 0..43
STATUSES = ("works", "partial", "missing")
# Where a row's reference figures come from: the paper's own table, figures the authors publish in their code
# (README, configs, logs), or figures vitlab worked out itself because neither is reachable here.
REFERENCE_KINDS = ("paper table", "official code", "reconstructed")
NO_REFERENCE = "-"  # the reference of a row with status "missing"
# Rows stay short: measured speeds and long histories belong in benchmarks/results/ and CHANGELOG.md.
MAX_CHARS = {"reference": 160, "verified": 400, "notes": 400}
REGENERATE = "python tools/make_models_doc.py"

_KIND = re.compile(r"^[BTHC](\+[BTHC])*$")
_ARXIV = re.compile(r"^(\d{4}\.\d{4,5})?$")
_REQUIRED = ("number", "title", "arxiv", "kind", "status", "reference", "verified", "issue", "notes")
_OPTIONAL = ("name",)
_DASH = "—"


class StatusError(ValueError):
    """The status file is malformed or disagrees with the model registry."""


@dataclass(frozen=True)
class PaperStatus:
    """One row of the status file (one paper of PAPERS.md)."""

    number: int
    title: str
    arxiv: str
    kind: str
    status: str
    reference: str
    verified: str
    issue: int | None
    notes: str
    name: str = ""

    @property
    def kind_letters(self) -> frozenset[str]:
        return frozenset(self.kind.replace("+", ""))

    @property
    def reference_kind(self) -> str:
        """One of REFERENCE_KINDS, or NO_REFERENCE."""
        return _split_reference(self.reference)[0]

    @property
    def reference_source(self) -> str:
        return _split_reference(self.reference)[1]


def _split_reference(reference: str) -> tuple[str, str]:
    """``"reconstructed: Swin-T widths"`` -> ``("reconstructed", "Swin-T widths")``."""
    kind, _, source = reference.partition(":")
    return kind.strip(), source.strip()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_row(index: int, row: Any) -> tuple[PaperStatus | None, list[str]]:
    """Validate one ``[[paper]]`` table; returns the parsed row (or None) and the problems found."""
    if not isinstance(row, dict):
        return None, [f"[[paper]] entry {index} is not a table"]
    where = f"row number={row.get('number')!r} (entry {index})"
    errors = [f"{where}: missing field {key!r}" for key in _REQUIRED if key not in row]
    errors += [f"{where}: unknown field {key!r}" for key in sorted(set(row) - set(_REQUIRED) - set(_OPTIONAL))]
    if errors:
        return None, errors
    if not _is_int(row["number"]) or row["number"] < 0:
        errors.append(f"{where}: number must be a non-negative integer")
    for key in ("title", "arxiv", "kind", "status", "reference", "verified", "notes", *_OPTIONAL):
        if key in row and not isinstance(row[key], str):
            errors.append(f"{where}: {key} must be a string")
    if errors:
        return None, errors
    status, verified, issue = row["status"], row["verified"].strip(), row["issue"]
    if status not in STATUSES:
        errors.append(f"{where}: invalid status {status!r}; expected one of {', '.join(STATUSES)}")
    if not _KIND.match(row["kind"]):
        errors.append(f"{where}: invalid kind {row['kind']!r}; expected letters B/T/H/C joined by '+', e.g. 'B+T'")
    if not _ARXIV.match(row["arxiv"]):
        errors.append(f"{where}: arxiv must be an id like '2103.14030' or \"\", got {row['arxiv']!r}")
    if not row["title"].strip():
        errors.append(f"{where}: title is empty")
    if not (issue == "" or (_is_int(issue) and issue > 0)):
        errors.append(f'{where}: issue must be a positive issue number or "" (none filed), got {issue!r}')
    if status == "missing" and verified:
        errors.append(f"{where}: status is 'missing' but 'verified' is filled in; empty it or change the status")
    if status in ("partial", "works") and not verified:
        errors.append(f"{where}: status is {status!r} but 'verified' does not say how it was verified")
    errors += _check_reference(where, status, row["reference"].strip())
    for key, limit in MAX_CHARS.items():
        if len(row[key].strip()) > limit:
            errors.append(
                f"{where}: {key} has {len(row[key].strip())} characters, more than {limit}; keep the essentials "
                "(measured speeds belong in benchmarks/results/, a row may name the file)"
            )
    if errors:
        return None, errors
    parsed = PaperStatus(
        number=row["number"],
        title=row["title"].strip(),
        arxiv=row["arxiv"],
        kind=row["kind"],
        status=status,
        reference=row["reference"].strip(),
        verified=verified,
        issue=issue if issue != "" else None,
        notes=row["notes"].strip(),
        name=row.get("name", "").strip(),
    )
    return parsed, []


def _check_reference(where: str, status: str, reference: str) -> list[str]:
    kinds = ", ".join(repr(kind) for kind in REFERENCE_KINDS)
    if reference == NO_REFERENCE:
        if status == "missing":
            return []
        return [f"{where}: status is {status!r} but reference is {NO_REFERENCE!r}; name one of {kinds} and the source"]
    kind, source = _split_reference(reference)
    if kind not in REFERENCE_KINDS:
        return [f"{where}: invalid reference {reference!r}; expected one of {kinds}, then ': ' and the source"]
    if not source:
        return [f"{where}: reference {reference!r} names no source; write '{kind}: <where the figures come from>'"]
    return []


def load_status(path: str | Path = STATUS_PATH, numbers: Iterable[int] = range(NUM_PAPERS)) -> dict[int, PaperStatus]:
    """Read and validate a status file: exactly one valid row for each of ``numbers``.

    Raises:
        StatusError: listing every problem found (missing, duplicate or unexpected rows, bad fields).
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise StatusError(f"{path}: status file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise StatusError(f"{path}: not valid TOML: {exc}") from exc
    rows = data.get("paper")
    if not isinstance(rows, list) or not rows:
        raise StatusError(f"{path}: expected [[paper]] tables, found none")
    unknown_top = sorted(set(data) - {"paper"})
    errors = [f"unknown top-level key {key!r}" for key in unknown_top]
    parsed: dict[int, PaperStatus] = {}
    for index, row in enumerate(rows):
        entry, problems = _check_row(index, row)
        errors += problems
        if entry is None:
            continue
        if entry.number in parsed:
            errors.append(f"duplicate row for paper number {entry.number}")
        parsed[entry.number] = entry
    expected = set(numbers)
    missing = sorted(expected - set(parsed))
    extra = sorted(set(parsed) - expected)
    # A row that failed validation is reported above; do not also call it missing.
    failed = {row["number"] for row in rows if isinstance(row, dict) and _is_int(row.get("number"))} - set(parsed)
    missing = [n for n in missing if n not in failed]
    if missing:
        errors.append(f"missing row(s) for paper number(s) {', '.join(map(str, missing))}")
    if extra:
        known = f"{min(expected)}..{max(expected)}" if expected else "none"
        errors.append(f"row(s) for unknown paper number(s) {', '.join(map(str, extra))} (expected {known})")
    if errors:
        raise StatusError(f"{path}:\n  " + "\n  ".join(errors))
    return dict(sorted(parsed.items()))


def registry_variants() -> dict[str, Any]:
    """Every registered vitlab model name mapped to its ``VariantSpec``."""
    import vitlab

    return {name: vitlab.get_variant(name) for name in vitlab.list_models()}


def group_models(status: Mapping[int, PaperStatus], variants: Mapping[str, Any]) -> dict[int, list[str]]:
    """Model names per paper number, after checking the registry against the status rows.

    Raises:
        StatusError: a model names a paper without a row, its paper kind disagrees with the row,
            or a row says "missing" although models are registered for it.
    """
    errors: list[str] = []
    grouped: dict[int, list[str]] = {number: [] for number in status}
    for name in sorted(variants):
        paper = variants[name].paper
        row = status.get(paper.number)
        if row is None:
            errors.append(f"model {name!r} is registered for paper #{paper.number}, which has no status row")
            continue
        if frozenset(paper.kind.replace("+", "")) != row.kind_letters:
            errors.append(
                f"model {name!r}: Paper kind {paper.kind!r} disagrees with row #{row.number} kind {row.kind!r}"
            )
        grouped[paper.number].append(name)
    for number, names in grouped.items():
        if names and status[number].status == "missing":
            errors.append(
                f"row #{number} says 'missing' but models are registered for it ({', '.join(names)}); "
                "set its status to 'partial' or 'works' and say how it was verified"
            )
    if errors:
        raise StatusError("status file and model registry disagree:\n  " + "\n  ".join(errors))
    return grouped


def _cell(text: str) -> str:
    """Make text safe inside one markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|") or _DASH


def _paper_cell(row: PaperStatus) -> str:
    title = _cell(row.title)
    if row.arxiv:
        title = f"[{title}](https://arxiv.org/abs/{row.arxiv})"
    return f"**{_cell(row.name)}**<br>{title}" if row.name else title


def _reference_cell(row: PaperStatus) -> str:
    if row.reference_kind == NO_REFERENCE:
        return _DASH
    return f"**{row.reference_kind}**<br>{_cell(row.reference_source)}"


def _notes_cell(row: PaperStatus) -> str:
    parts = []
    if row.verified:
        parts.append(f"*Verified:* {_cell(row.verified)}")
    if row.notes:
        parts.append(f"*Notes:* {_cell(row.notes)}")
    return "<br>".join(parts) or _DASH


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _paper_table(status: Mapping[int, PaperStatus], grouped: Mapping[int, Sequence[str]]) -> list[str]:
    lines = [
        "| # | paper | kind | vitlab models | status | reference figures | verified / notes | issue |",
        "|---:|---|---|---|---|---|---|---|",
    ]
    for number, row in status.items():
        models = ", ".join(f"`{name}`" for name in grouped[number]) or _DASH
        issue = f"#{row.issue}" if row.issue is not None else _DASH
        lines.append(
            f"| {number} | {_paper_cell(row)} | {row.kind} | {models} | {row.status} | {_reference_cell(row)} "
            f"| {_notes_cell(row)} | {issue} |"
        )
    return lines


def _model_table(variants: Mapping[str, Any]) -> list[str]:
    from vitlab.models._variants import NO_SCRIPT_REASON

    lines = [
        "| model | paper # | params (M) | reference source | timm-native | isotropic | any input size "
        "| grad checkpointing | exportable | FX trace | TorchScript |",
        "|---|---:|---:|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(variants):
        spec = variants[name]
        params = f"{spec.ref_params_m:g}" if spec.ref_params_m is not None else _DASH
        reason = f" ({_cell(spec.export_reason)})" if spec.export_reason else ""
        exportable = "yes" if spec.exportable else f"no{reason}"
        fx = "yes" if spec.fx_traceable else f"no ({_cell(spec.fx_reason)})"
        # the common reason is stated once above the table
        script_reason = "" if spec.script_reason == NO_SCRIPT_REASON else f" ({_cell(spec.script_reason)})"
        script = "yes" if spec.scriptable else f"no{script_reason}"
        lines.append(
            f"| `{name}` | {spec.paper.number} | {params} | {_cell(spec.ref_source)} | "
            f"{_yes_no(spec.timm_native)} | {_yes_no(spec.isotropic)} | {_yes_no(spec.dynamic_size)} | "
            f"{_yes_no(spec.grad_checkpointing)} | {exportable} | {fx} | {script} |"
        )
    return lines


def _task_table() -> list[str]:
    from vitlab.tasks import TASKS

    lines = [
        "| task model | task | paper | metric | default data set | reference | exportable |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(TASKS):
        spec = TASKS[name]
        paper = f"#{spec.paper.number} {_cell(spec.paper.title)}" if spec.paper is not None else "none (generic)"
        direction = "higher is better" if spec.higher_is_better else "lower is better"
        ref = f"{spec.ref_metric:g} ({_cell(spec.ref_source)})" if spec.ref_metric is not None else _DASH
        exportable = "yes" if spec.exportable else f"no ({_cell(spec.export_reason)})"
        lines.append(
            f"| `{name}` | {spec.task} | {paper} | {spec.metric} ({direction}) | `{spec.dataset}` | {ref} "
            f"| {exportable} |"
        )
    return lines


def render(status_path: str | Path = STATUS_PATH, variants: Mapping[str, Any] | None = None) -> str:
    """The full text of ``docs/models.md`` (deterministic: same inputs, same bytes)."""
    status = load_status(status_path)
    from vitlab.models._variants import NO_SCRIPT_REASON

    variants = registry_variants() if variants is None else variants
    grouped = group_models(status, variants)
    counts = {s: sum(row.status == s for row in status.values()) for s in STATUSES}
    summary = " · ".join(f"{counts[s]} {s}" for s in STATUSES)
    references = {k: sum(row.reference_kind == k for row in status.values()) for k in REFERENCE_KINDS}
    reference_summary = " · ".join(f"{references[k]} {k}" for k in REFERENCE_KINDS)
    lines = [
        "# vitlab models",
        "",
        "<!-- Generated by tools/make_models_doc.py: do not edit by hand. -->",
        "> **Generated file, do not edit by hand.** Paper status lives in `src/vitlab/paper_status.toml`, models in",
        f"> each family's `VARIANTS` table. After changing either, run `{REGENERATE}`",
        "> (CI runs it with `--check`).",
        "",
        "Every paper vitlab covers (the rows of `PAPERS.md`) and how far it is. Status says what runs and is",
        "verified: **works** (all that PAPERS.md lists for the paper), **partial** (some of it), **missing**",
        "(nothing usable yet). Reference figures says, separately, where the numbers a paper's models are checked",
        "against come from: the **paper table**, the **official code** (README, configs, logs), or",
        "**reconstructed** by vitlab (counted from the official code's configuration or from a reconstructed",
        "layout) when neither is reachable here. A paper whose mechanics all work and are verified, and whose only",
        "gap is a paper table this environment cannot reach, reads **works** with **reconstructed** references.",
        "Kinds: **B** backbone, **T** technique, **H** task model or head, **C** component of a larger generative",
        "or multi-modal system. Measured speeds live in `benchmarks/results/`.",
        "",
        f"**Summary:** {summary} ({len(status)} papers, {len(variants)} registered models). "
        f"Reference figures: {reference_summary}.",
        "",
        "## Papers",
        "",
        *_paper_table(status, grouped),
        "",
        "## Registered models",
        "",
        "Reference parameter counts (`ref_params_m`) and their source (`ref_source`: a paper table, the official",
        "code, or reconstructed) come from each variant's `VARIANTS` row; the parity test checks the built model",
        "against them. Capabilities are what each variant declares and the registry tests rely on.",
        "FX trace: FX symbolic tracing works (vitlab's classes: plain `torch.fx.symbolic_trace`; timm's: with timm's",
        "leaf modules and wrapped functions), hence torchvision's `create_feature_extractor` and timm's FX feature",
        f"path. TorchScript: {NO_SCRIPT_REASON} (`torch.jit.script` works only where the row says yes).",
        "",
        *_model_table(variants),
        "",
        "## Task models",
        "",
        "Task models (`vitlab.tasks`, `vitlab train --task NAME --backbone MODEL`) take any registered backbone",
        "by name; each row is a `TaskSpec`. Measured results live in `benchmarks/results/` (e.g. `segmentation.md`).",
        "",
        *_task_table(),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the file is out of date")
    parser.add_argument("--status", type=Path, default=STATUS_PATH, help="status file (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=DOC_PATH, help="markdown file (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        text = render(args.status)
    except StatusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
    if args.check:
        if current == text:
            return 0
        print(f"{args.output} is out of date; regenerate it with `{REGENERATE}`.", file=sys.stderr)
        diff = list(difflib.unified_diff(current.splitlines(), text.splitlines(), "on disk", "generated", lineterm=""))
        print("\n".join(diff[:60]) + ("\n..." if len(diff) > 60 else ""), file=sys.stderr)
        return 1
    if current != text:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {args.output}")
    else:
        print(f"{args.output} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
