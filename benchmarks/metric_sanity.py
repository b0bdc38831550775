"""Sanity measurements of the sample metrics (issue 4), and the shipped reference statistics.

    python benchmarks/metric_sanity.py --train TRAIN.zip --test TEST.zip --out DIR [--features cifar10]

Writes DIR/stats_train.npz and DIR/stats_test.npz (the statistics gacq ships), and
DIR/metric_sanity.json + .md with:
- FID(train, test): the floor a perfect model of the training distribution reaches;
- FID between two disjoint random halves of the training set;
- FID of the test set against the training statistics as the test images are degraded
  (Gaussian noise, Gaussian blur, colour-depth reduction), which must rise monotonically;
- the wall time of computing the statistics of the 50k training images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.data import load_images  # noqa: E402
from gacq.metrics import compute_stats, frechet_distance, get_feature_extractor  # noqa: E402
from gacq.utils import git_commit, machine_info, write_json  # noqa: E402


def noise(x: np.ndarray, sigma: float, rng) -> np.ndarray:
    return np.clip(x.astype(np.float32) + rng.normal(0, sigma, x.shape), 0, 255).round().astype(np.uint8)


def blur(x: np.ndarray, radius: float) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(radius))) for a in x])


def bits(x: np.ndarray, b: int) -> np.ndarray:
    step = 2 ** (8 - b)
    return (x // step * step + step // 2).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--features", default="cifar10")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-size", type=int, default=1000)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    ext = get_feature_extractor(args.features, args.device)
    train = load_images(args.train).images
    test = load_images(args.test).images

    def stats(x, src, **kw):
        return compute_stats(x, ext, args.batch_size, source=src, progress=False, **kw)

    def fid(a, b):
        return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)

    t0 = time.time()
    st_train = stats(train, f"{args.train} ({len(train)} images)")
    train_s = time.time() - t0
    st_test = stats(test, f"{args.test} ({len(test)} images)")
    st_train.save(out / "stats_train.npz")
    st_test.save(out / "stats_test.npz")

    rng = np.random.default_rng(0)
    perm = rng.permutation(len(train))
    h = len(train) // 2
    half_a, half_b = stats(train[perm[:h]], "train half A"), stats(train[perm[h:2 * h]], "train half B")
    res = {
        "feature_network": {"name": ext.name, "hash": ext.hash, "note": ext.note},
        "train_n": len(train), "test_n": len(test),
        "fid_train_test": fid(st_test, st_train),
        "sfid_train_test": frechet_distance(st_test.mu_spatial, st_test.sigma_spatial,
                                            st_train.mu_spatial, st_train.sigma_spatial),
        "fid_train_halves": fid(half_a, half_b),
        "is_train": st_train.inception_score()[0], "is_test": st_test.inception_score()[0],
        "train_stats_wall_s": train_s, "device": str(ext.device),
        "degradations": {},
    }
    series = {
        "gaussian_noise_sigma": ([2, 4, 8, 16, 32, 64], lambda x, v: noise(x, v, np.random.default_rng(1))),
        "gaussian_blur_radius": ([0.5, 1.0, 1.5, 2.0, 3.0], blur),
        "colour_bits": ([6, 5, 4, 3, 2], bits),
    }
    for name, (levels, fn) in series.items():
        rows = []
        for v in levels:
            st = stats(fn(test, v), f"test, {name}={v}")
            rows.append({"level": v, "fid": fid(st, st_train)})
        fids = [r["fid"] for r in rows]
        res["degradations"][name] = {"rows": rows, "monotonic": all(b > a for a, b in zip(fids, fids[1:]))}
    res.update({"command": " ".join(["python"] + sys.argv), "commit": git_commit(), "machine": machine_info(),
                "wall_s": time.time() - t_start})
    write_json(out / "metric_sanity.json", res)
    fn = res["feature_network"]
    md = [f"# Metric sanity checks ({fn['name']} features, hash {fn['hash']})", "",
          f"Feature network: {fn['note']}. CIFAR-10 here is the JPEG redistribution (shared/data), so these",
          "figures are comparable only with figures against the same images and network.", "",
          "| check | value |", "| --- | --- |",
          f"| FID(test {res['test_n']}, train {res['train_n']}) | {res['fid_train_test']:.3f} |",
          f"| sFID(test {res['test_n']}, train {res['train_n']}) | {res['sfid_train_test']:.3f} |",
          f"| FID(two disjoint random halves of train) | {res['fid_train_halves']:.3f} |",
          f"| IS train / test | {res['is_train']:.3f} / {res['is_test']:.3f} |",
          f"| statistics of the {res['train_n']} train images ({res['device']}) | {train_s:.1f} s |", ""]
    for name, d in res["degradations"].items():
        md += [f"**{name}** (test vs train statistics; monotonic: {d['monotonic']}):", "",
               "| level | FID |", "| --- | --- |"] + [f"| {r['level']} | {r['fid']:.3f} |" for r in d["rows"]] + [""]
    md += [f"Command: `{res['command']}`", f"Commit: {res['commit']}", f"Wall time: {res['wall_s']:.0f} s", ""]
    (out / "metric_sanity.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
