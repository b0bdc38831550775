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


README_ROWS = {"FP": "fp", "round-to-nearest": "rtn", "PTQ4DM": "ptq4dm", "PTQ4DM, 20 draws (equal data)": "ptq4dm (20 draws)",
               "Q-Diffusion": "qdiffusion", "TFMQ-DM": "tfmq", "TFMQ-DM + bias correction": "tfmq+bc", "GAC": "gac",
               "GAC + bias correction": "gac+bc"}


def test_the_readmes_results_table_quotes_the_committed_cells():
    """The README's FID table at 100 steps (hand-written: it names the methods in full and lists each seed) against the
    cells of results/experiments/cifar10-table: every mean ± sd as the report pools it, every per-seed figure in seed
    order, and an empty or "not run" entry exactly where the report has none."""
    from gacq.report import _by_seed, _fmt, _runs, aggregate, load_cells

    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, s in enumerate(lines) if s.strip().startswith("| method | FP | W8A8 | W4A32 | W4A8 |"))
    header = [c.strip() for c in lines[start].strip().strip("|").split("|")]
    rows = []
    for s in lines[start + 2:]:
        if not s.strip().startswith("|"):
            break
        rows.append([c.strip().replace("**", "") for c in s.strip().strip("|").split("|")])
    assert {r[0] for r in rows} == set(README_ROWS), [r[0] for r in rows]
    groups = {(k[2], k[3]): g for k, g in aggregate(load_cells(ROOT / "results/experiments/cifar10-table")).items()
              if k[0].startswith("cifar10 ") and k[4] == 100 and not k[5]}
    checked = 0
    for r in rows:
        for bits, quoted in zip(header[1:], r[1:]):
            g = groups.get((README_ROWS[r[0]], bits))
            where = f"README's {r[0]} at {bits}"
            if quoted in ("", "not run"):
                assert g is None, f"{where} is {quoted!r} but the report has {_fmt(g['metrics']['fid'], 2, _runs(g))}"
                continue
            assert g is not None, f"{where} quotes {quoted} but no cell of results/experiments/cifar10-table has it"
            head, _, seeds = quoted.partition(" (")
            assert _fmt(g["metrics"]["fid"], 2).split(" (")[0] == head, (where, quoted)
            if seeds:  # per seed, in seed order; "not run" where the pooled entry lacks that seed
                per_seed = [v for _, v in sorted(_by_seed(g, "fid").items())]
                figures = [x for x in seeds.rstrip(")").split(", ") if x != "not run"]
                assert [f"{v:.2f}" for v in per_seed] == figures, (where, quoted, per_seed)
            checked += 1
    assert checked >= 30
