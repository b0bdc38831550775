"""The reports committed under results/ are what `gacq report` renders now from the cells committed beside them: a cell
added or changed without rendering its report again (here: `scripts/gpu-unpack.sh` does both the experiment's report
and `results/README.md`), or a report edited by hand, fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gacq.report import build

ROOT = Path(__file__).resolve().parent.parent
RENDERED = re.compile(r"^Rendered by `gacq report (\S+) --out (\S+)` from \d+ cell result")


def _reports() -> list[Path]:
    return sorted(p for p in (ROOT / "results").rglob("README.md")
                  if len(lines := p.read_text().splitlines()) > 2 and RENDERED.match(lines[2]))


def test_results_has_the_report_of_every_cell():
    """The issue's `gacq report results/ --out results/README.md`: one report over every experiment, with each
    experiment's own report beside its cells."""
    reports = _reports()
    assert ROOT / "results/README.md" in reports
    assert len(reports) >= 5, reports


@pytest.mark.parametrize("path", _reports(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_committed_report_is_what_gacq_report_renders_now(path, monkeypatch):
    text = path.read_text()
    lines = text.splitlines()
    folder, out = RENDERED.match(lines[2]).groups()
    monkeypatch.chdir(ROOT)  # the report names its folder and output as they were given, relative to the checkout
    assert Path(out).resolve() == path.resolve(), f"{path} says it was rendered to {out}"
    rep = build(folder, out, title=lines[0].removeprefix("# "))
    want = "\n".join(rep["md"]) + "\n"
    if want != text:
        diff = [f"line {i + 1}:\n  committed: {a}\n  rendered:  {b}"
                for i, (a, b) in enumerate(zip(text.splitlines(), want.splitlines())) if a != b][:3]
        pytest.fail(f"{path.relative_to(ROOT)} is stale: run `gacq report {folder} --out {out} --title "
                    f"'{lines[0].removeprefix('# ')}'` and commit it ({len(lines)} lines committed, "
                    f"{len(rep['md'])} rendered)\n" + "\n".join(diff))
