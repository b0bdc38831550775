"""Weight SQNR of every quantized layer of one or more checkpoints against the float model they were quantized from.

    python benchmarks/weight_sqnr.py QDIR [QDIR ...] [--model M] [--out OUT.json]

For each checkpoint: per layer 10 log10(|W|^2 / |W - W_hat|^2) of the fake-quant weight W_hat (`sqnr_db`), and the mean,
minimum and maximum over its layers. The float model is the bundled one unless --model names another.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from gacq.models import load_model
from gacq.quant.quantizer import sqnr_db
from gacq.quant.wrap import quant_layers
from gacq.utils import write_json


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("qdirs", nargs="+", type=Path)
    p.add_argument("--model", default=None, help="the float model (default: the bundled one)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    fp = dict(load_model(args.model).model.named_modules())
    out = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
           "checkpoints": {}}
    for qdir in args.qdirs:
        q = load_model(qdir)
        per_layer = {}
        with torch.no_grad():
            for n, m in quant_layers(q.model):
                per_layer[n] = round(sqnr_db(fp[n].weight.float(), m.quantized_weight().float()), 3)
        t = torch.tensor(list(per_layer.values()))
        out["checkpoints"][str(qdir)] = {"layers": len(per_layer), "mean_db": round(float(t.mean()), 2),
                                         "min_db": round(float(t.min()), 2), "max_db": round(float(t.max()), 2),
                                         "per_layer_db": per_layer}
        print(qdir, {k: v for k, v in out["checkpoints"][str(qdir)].items() if k != "per_layer_db"})
    if args.out is not None:
        write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
