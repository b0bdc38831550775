"""benchmarks/parallel_throughput.py: P copies of a command started together, timed against one alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "parallel_throughput.py"


def run(tmp_path, *cmd, procs="1,3"):
    return subprocess.run([sys.executable, str(SCRIPT), "--procs", procs, "--out", str(tmp_path / "out"), "--", *cmd],
                          capture_output=True, text=True, timeout=120, check=False)


def test_copies_get_their_index_and_folder_and_the_gain_is_computed(tmp_path):
    # each copy sleeps 0.5 s and writes its index into its own folder: three at once take about as long as one
    code = ("import pathlib, sys, time; time.sleep(0.5); d = pathlib.Path(sys.argv[2]); d.mkdir(); "
            "(d / 'i').write_text(sys.argv[1]); (pathlib.Path(sys.argv[3]) / ('copy' + sys.argv[1])).touch()")
    seen = tmp_path / "seen"
    seen.mkdir()
    r = run(tmp_path, sys.executable, "-c", code, "{i}", "{dir}", str(seen))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "out" / "parallel_throughput.json").read_text())
    rows = {row["procs"]: row for row in res["rows"]}
    assert sorted(rows) == [1, 3] and all(row["ok"] for row in rows.values())
    assert sorted(p.name for p in seen.iterdir()) == ["copy0", "copy1", "copy2"]  # indices 0..P-1 (1-copy run: 0)
    gain = rows[3]["throughput_gain"]
    assert gain == round((3 / rows[3]["wall_seconds"]) / (1 / rows[1]["wall_seconds"]), 3) and gain > 1.5
    assert "| 3 |" in (tmp_path / "out" / "parallel_throughput.md").read_text()


def test_a_failing_copy_is_reported(tmp_path):
    r = run(tmp_path, sys.executable, "-c", "import sys; sys.exit(int(sys.argv[1]) == 1)", "{i}", procs="2")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "out" / "parallel_throughput.json").read_text())
    rows = {row["procs"]: row for row in res["rows"]}
    assert rows[1]["ok"] and not rows[2]["ok"] and rows[2]["exit_codes"] == [0, 1]
    assert "failed" in (tmp_path / "out" / "parallel_throughput.md").read_text()
