"""Side-by-side comparison of a float model and a quantized one from the same noise.

`compare(fp, q, cfg, out)` samples both with identical per-sample generators and writes:
    side_by_side.png   FP row over quantized row, image by image
    fp.npz, quantized.npz
    report.md, report.json   pixel PSNR against the FP images (same noise), and the sample
                             metrics of each set on the cifar10 feature network when the images
                             are 32x32 RGB (FID against the bundled CIFAR-10 training statistics;
                             from a handful of images it is heavily biased, and says so)
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .models import LoadedModel
from .sampling import SampleConfig, advance, generate
from .utils import atomic_path, git_commit, image_grid, machine_info, save_image, write_json


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 images b against a."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return np.where(mse > 0, 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12)), np.inf)


def contrast(images: np.ndarray) -> float:
    """Mean over images (N, H, W, C) of each image's pixel standard deviation, all channels together (in the
    images' own units: 0-255 for uint8)."""
    return float(images.reshape(len(images), -1).astype(np.float64).std(axis=1).mean())


def side_by_side(fp: np.ndarray, q: np.ndarray, per_row: int = 8):
    """Pairs of rows: FP images, then the quantized images from the same noise."""
    rows = []
    for i in range(0, len(fp), per_row):
        a, b = fp[i:i + per_row], q[i:i + per_row]
        if len(a) < per_row:
            pad = np.full((per_row - len(a),) + a.shape[1:], 255, np.uint8)
            a, b = np.concatenate([a, pad]), np.concatenate([b, pad])
        rows += [a, b]
    return image_grid(np.concatenate(rows), ncols=per_row)


def _images(loaded: LoadedModel, cfg: SampleConfig, device, desc: str, progress: bool) -> np.ndarray:
    """Images 0 .. cfg.num - 1 of `loaded` in batches of cfg.batch_size (per-image noise: the batches change them only
    by float rounding in batched kernels), with a progress bar that advances every denoising step."""
    bar = tqdm(total=cfg.num, desc=desc, unit="img", disable=not progress, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}]")
    parts = []
    for lo in range(0, cfg.num, cfg.batch_size):
        idx = range(lo, min(cfg.num, lo + cfg.batch_size))
        parts.append(generate(loaded, cfg, idx, device, on_step=advance(bar)))
        bar.n = idx.stop  # undo float drift of the per-step fractions
        bar.refresh()
    bar.close()
    return np.concatenate(parts)


def compare(fp: LoadedModel, q: LoadedModel, cfg: SampleConfig, out: str | Path, device="cpu",
            metrics: bool = True, label: str = "quantized", progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if q.step_hook is not None:
        q.step_hook(0, cfg)  # refuse a sampler the quantized model was not calibrated for, early
    t0 = time.time()
    a = _images(fp, cfg, device, "sampling FP", progress)
    t_fp = time.time() - t0
    t0 = time.time()
    b = _images(q, cfg, device, f"sampling {label}", progress)
    t_q = time.time() - t0
    p = psnr(a, b)
    report = {
        "label": label, "num": cfg.num, "sampler": {"scheduler": cfg.scheduler, "steps": cfg.steps,
                                                    "eta": cfg.eta, "timestep_spacing": cfg.timestep_spacing},
        "seed": cfg.seed, "psnr_db_mean": float(np.mean(p[np.isfinite(p)])) if np.isfinite(p).any() else float("inf"),
        "psnr_db_min": float(np.min(p)), "sample_seconds": {"fp": t_fp, label: t_q},
        "fp_model": fp.source, "quantized_model": q.source, "commit": git_commit(), "machine": machine_info(),
    }
    if metrics and a.shape[1:] == (32, 32, 3) and cfg.num >= 10:
        from .metrics import evaluate

        for name, imgs in (("fp", a), (label, b)):
            r = evaluate(imgs, None, device=device, pr_max=cfg.num, progress=False)
            report[f"metrics_{name}"] = {k: r[k] for k in ("fid", "sfid", "is_mean", "precision", "recall")}
            report["feature_network"] = r["feature_network"]
    for name, imgs in (("fp.npz", a), ("quantized.npz", b)):
        with atomic_path(out / name) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=imgs)
    save_image(side_by_side(a, b), out / "side_by_side.png")
    write_json(out / "report.json", report)
    lines = [f"# FP vs {label}: {cfg.num} images from the same noise", "",
             f"Sampler: {cfg.scheduler} {cfg.steps} steps, eta {cfg.eta}, {cfg.timestep_spacing} spacing, seed {cfg.seed}.",
             f"`side_by_side.png`: each FP row is followed by the {label} row from the same noise.", "",
             f"Pixel PSNR of the {label} images against the FP images: mean {report['psnr_db_mean']:.2f} dB, "
             f"min {report['psnr_db_min']:.2f} dB.", ""]
    if "feature_network" in report:
        fn = report["feature_network"]
        lines += [f"Sample metrics on the **{fn['name']}** feature network (hash {fn['hash']}; {fn['note']}), "
                  f"against the CIFAR-10 training statistics. With {cfg.num} images FID is heavily biased "
                  f"upwards: compare the two rows with each other, not with published figures.", "",
                  "| model | FID | sFID | IS | precision | recall |", "| --- | --- | --- | --- | --- | --- |"]
        for name in ("fp", label):
            m = report[f"metrics_{name}"]
            lines.append(f"| {name} | {m['fid']:.1f} | {m['sfid']:.4f} | {m['is_mean']:.2f} | {m['precision']:.2f} | "
                         f"{m['recall']:.2f} |")
        lines.append("")
    lines += [f"Sampling time: FP {t_fp:.1f} s, {label} {t_q:.1f} s ({report['machine'].get('gpu') or 'CPU'}).", ""]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines))
    return report
