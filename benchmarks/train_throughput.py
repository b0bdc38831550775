"""Training throughput of the named configs, eager vs torch.compile, side by side in one run.

Runs `gacq.train` itself (the real loop: data on GPU, bf16 autocast, AdamW, EMA) for a few
hundred steps per setting and reads images/s from its JSON-lines log, skipping the first
log interval (compilation and warm-up). Writes JSON + markdown to --out.

    python benchmarks/train_throughput.py --data .data/cifar10-mosaic-train.zip --out results/train_throughput
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.train import TrainConfig, train  # noqa: E402
from gacq.utils import git_commit, machine_info, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default="small,ddpm-cifar10")
    ap.add_argument("--batch-sizes", default="128")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args()
    rows = []
    t_all = time.time()
    for config in args.configs.split(","):
        for bs in map(int, args.batch_sizes.split(",")):
            for compiled in (False, True):
                tmp = Path(tempfile.mkdtemp())
                t0 = time.time()
                cfg = TrainConfig(data=args.data, config=config, batch_size=bs, max_steps=args.steps,
                                  log_every=args.log_every, ckpt_every=10**9, grid_num=0, compile=compiled)
                train(cfg, tmp / "run", progress=False)
                logs = [json.loads(line) for line in (tmp / "run" / "log.jsonl").read_text().splitlines()]
                ips = statistics.median(r["images_per_s"] for r in logs[1:])
                rows.append({"config": config, "batch_size": bs, "compile": compiled,
                             "images_per_s": round(ips, 1), "steps_per_s": round(ips / bs, 2),
                             "wall_s_incl_compile": round(time.time() - t0, 1)})
                print(rows[-1], flush=True)
                shutil.rmtree(tmp)
    command = "python " + " ".join(sys.argv)
    result = {"command": command, "commit": git_commit(), "machine": machine_info(),
              "wall_seconds": round(time.time() - t_all, 1), "rows": rows}
    out = Path(args.out)
    write_json(out.with_suffix(".json"), result)
    lines = ["# Training throughput (bf16 autocast, AdamW + EMA, data on GPU)", "",
             f"Command: `{command}`  ", f"Commit: {result['commit']}  ",
             f"Machine: {result['machine'].get('gpu', 'cpu')}, torch {result['machine']['torch']}  ",
             f"Wall time: {result['wall_seconds']} s", "",
             "| config | batch | mode | images/s | steps/s | ratio vs eager |", "|---|---|---|---|---|---|"]
    for r in rows:
        eager = next(e for e in rows if e["config"] == r["config"] and e["batch_size"] == r["batch_size"]
                     and not e["compile"])
        lines.append(f"| {r['config']} | {r['batch_size']} | {'compiled' if r['compile'] else 'eager'} | "
                     f"{r['images_per_s']} | {r['steps_per_s']} | {r['images_per_s'] / eager['images_per_s']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
