"""benchmarks/sample_fidelity.py run as a script on sample folders written to disk: per-image PSNR against a naive
loop, and the paired difference (--pair) against scipy's paired t-test interval."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "sample_fidelity.py"
META = {"seed": 0, "steps": 100, "scheduler": "ddim", "eta": 0.0, "num": 12}


def _folder(path: Path, images: np.ndarray, model: str, **meta) -> str:
    path.mkdir(parents=True)
    np.savez(path / "samples.npz", images=images)
    (path / "meta.json").write_text(json.dumps({**META, "model": model, **meta}))
    return str(path)


def naive_psnr(a: np.ndarray, b: np.ndarray) -> list[float]:
    out = []
    for x, y in zip(a, b):
        err = [(float(u) - float(v)) ** 2 for u, v in zip(x.ravel(), y.ravel())]
        out.append(10 * math.log10(255.0**2 / (sum(err) / len(err))))
    return out


def _run(tmp_path, *args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=tmp_path)


def test_psnr_and_paired_difference(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    noisy = lambda s: np.clip(ref + rng.normal(0, s, ref.shape), 0, 255).round().astype(np.uint8)
    a, b = noisy(rng.uniform(3, 9, (12, 1, 1, 1))), noisy(rng.uniform(3, 9, (12, 1, 1, 1)))
    fp = _folder(tmp_path / "fp", ref, "fp")
    fa = _folder(tmp_path / "a", a, "q (activations float)")
    fb = _folder(tmp_path / "b", b, "q")
    r = _run(tmp_path, "--ref", fp, "--out", tmp_path / "res/fidelity", "--pair", f"{fa}:{fb}", fa, fb)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "res/fidelity.json").read_text())
    pa, pb = naive_psnr(a, ref), naive_psnr(b, ref)
    assert [row["model"] for row in res["rows"]] == ["q (activations float)", "q"]
    assert abs(res["rows"][0]["psnr_mean_db"] - np.mean(pa)) < 0.006  # rounded to 2 decimals
    assert abs(res["rows"][1]["psnr_min_db"] - min(pb)) < 0.006
    (d,) = res["pairs"]
    ci = stats.ttest_rel(pa, pb).confidence_interval(0.95)
    assert abs(d["mean_db"] - (np.mean(pa) - np.mean(pb))) < 1e-3
    np.testing.assert_allclose(d["ci95_db"], [ci.low, ci.high], atol=1e-3)
    assert d["a_closer"] == sum(x > y for x, y in zip(pa, pb)) and d["n"] == 12
    md = (tmp_path / "res/fidelity.md").read_text()
    assert f"| {d['a_closer']} of 12 |" in md and "q (activations float)" in md


def test_bad_pairs_and_mismatched_samplers_are_refused(tmp_path):
    ref = np.zeros((12, 8, 8, 3), dtype=np.uint8)
    fp = _folder(tmp_path / "fp", ref, "fp")
    fa = _folder(tmp_path / "a", ref + 1, "q")
    r = _run(tmp_path, "--ref", fp, "--out", tmp_path / "o", "--pair", f"{fa}:elsewhere", fa)
    assert r.returncode != 0 and "among the sample folders" in r.stderr, r.stderr
    fc = _folder(tmp_path / "c", ref + 1, "q", steps=50)
    r = _run(tmp_path, "--ref", fp, "--out", tmp_path / "o", fc)
    assert r.returncode != 0 and "steps differs from the reference" in r.stderr, r.stderr
    assert not (tmp_path / "o.json").exists()
