"""Does running several gacq jobs at once on one GPU raise throughput? (issue 7: small models leave an H100
mostly idle; `gacq experiment run --parallel N` runs N cells as processes side by side.)

For each P in --procs it starts P copies of one command at the same moment, waits for all of them, and
records the wall time. Throughput is P jobs / wall; the gain is that throughput over the throughput of one
copy alone, measured in the same run (so the same machine state). The command is given after `--`; `{i}`
is replaced by the copy's index and `{dir}` by a fresh folder for it (different seeds, separate outputs).

    # on the GPU: 2,000 images of the bundled model, DDIM 100, one to four at a time (a few minutes)
    python benchmarks/parallel_throughput.py --procs 1,2,3,4 --out results/parallel_throughput -- \\
        gacq sample --num 2000 --steps 100 --batch-size 1000 --seed {i} --device cuda --out {dir}
    # quantization, short (200 iterations per unit), in its own run
    python benchmarks/parallel_throughput.py --procs 1,3 --out results/parallel_throughput_quant -- \\
        gacq quantize --method tfmq --wbits 4 --abits 8 --iters 200 --act-iters 50 --seed {i} --device cuda --out {dir}

Writes OUT/parallel_throughput.json (command, commit, machine, per-P wall times and per-copy exit codes) and
OUT/parallel_throughput.md. A copy that fails makes its row say so; the other rows still run.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.utils import git_commit, machine_info, write_json  # noqa: E402


def run_copies(template: list[str], p: int, root: Path) -> dict:
    """P copies of the command started together; wall time until the last one ends."""
    procs = []
    with contextlib.ExitStack() as logs:
        t0 = time.perf_counter()
        for i in range(p):
            d = root / f"p{p}_copy{i}"
            argv = [a.replace("{i}", str(i)).replace("{dir}", str(d)) for a in template]
            log = logs.enter_context(open(root / f"p{p}_copy{i}.log", "w"))
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        codes = [pr.wait() for pr in procs]
        wall = time.perf_counter() - t0
    tails = {i: (root / f"p{p}_copy{i}.log").read_text()[-500:] for i, c in enumerate(codes) if c != 0}
    return {"procs": p, "wall_seconds": round(wall, 3), "exit_codes": codes, "failed_log_tails": tails}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("give the command after `--` (see the docstring)")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", default="1,2,3,4", help="comma-separated copy counts; 1 is always run first")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv[:cut])
    template = argv[cut + 1:]
    if not template:
        raise SystemExit("the command after `--` is empty")
    if template[0] == "gacq":  # the same interpreter as this script
        template = [sys.executable, "-m", "gacq"] + template[1:]
    counts = sorted({1, *(int(p) for p in args.procs.split(",") if p.strip())})
    t_start = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gacq-parallel-") as tmp:
        for p in counts:
            print(f"[parallel] {p} cop{'y' if p == 1 else 'ies'} at once", flush=True)
            row = run_copies(template, p, Path(tmp))
            ok = all(c == 0 for c in row["exit_codes"])
            row["ok"] = ok
            if ok:
                row["jobs_per_hour"] = round(3600 * p / row["wall_seconds"], 2)
            rows.append(row)
            print(f"  wall {row['wall_seconds']:.1f} s, exit codes {row['exit_codes']}", flush=True)
    base = rows[0]
    for r in rows:
        if r["ok"] and base["ok"]:
            r["throughput_gain"] = round((r["procs"] / r["wall_seconds"]) / (1 / base["wall_seconds"]), 3)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python " + " ".join(map(shlex.quote, [sys.argv[0], *argv])), "commit": git_commit(),
              "machine": machine_info(), "job": " ".join(map(shlex.quote, argv[cut + 1:])), "rows": rows,
              "wall_seconds": round(time.time() - t_start, 1)}
    write_json(args.out / "parallel_throughput.json", result)
    lines = ["# Several jobs at once on one machine", "", f"`{result['command']}`", "",
             (f"commit {result['commit']}, {result['machine'].get('gpu', 'CPU')}, {result['wall_seconds']} s in all; "
              "gain = (copies / wall) / (1 / wall of one copy alone)"), "",
             "| copies at once | wall s | jobs per hour | throughput gain |", "|---:|---:|---:|---:|"]
    for r in rows:
        if r["ok"]:
            lines.append(f"| {r['procs']} | {r['wall_seconds']:.1f} | {r['jobs_per_hour']} | "
                         f"{r.get('throughput_gain', '-')} |")
        else:
            lines.append(f"| {r['procs']} | {r['wall_seconds']:.1f} | failed: exit codes {r['exit_codes']} | |")
    (args.out / "parallel_throughput.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'parallel_throughput.json'} and {args.out / 'parallel_throughput.md'}")


if __name__ == "__main__":
    main()
