"""`gacq report`: render experiment cell JSONs into markdown and HTML tables with plots.

Reads every `*.json` with the experiment-cell schema under a folder (recursively), groups seeds
of the same cell (mean and sample standard deviation), and writes:
- the main table per sampler step count (rows: methods, columns: bit widths) for FID, and the
  full metrics of every cell (sFID, IS, precision, recall, sample counts, seeds);
- calibration cost per quantization job (wall time, peak GPU memory);
- GAC hyperparameter ablations (cells with overrides) against the default;
- an FID bar chart (PNG) and an HTML page with the tables, the plot and the sample grids.
Every table names its feature network; cells measured on different feature networks are never
mixed in one table. Over a folder of several experiments (`gacq report results`) every table that
mixes them names each row's experiment, and the plots get a panel per experiment.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from .errors import GacqError
from .experiment import CELL_SCHEMA

BC = "+bc"  # rows of cells quantized with output bias correction: "<method>+bc"
TOK = "+tok"  # rows of cells with dynamic per-token Linear inputs (`act_granularity = "token"`): "<method>+tok"
W8 = "+w8"  # rows of cells with 8-bit weights in chosen layers (`w8_layers`): "<method>+w8<name>"
METHOD_ORDER = ["fp", "rtn", "brecq", "ptq4dm", "qdiffusion", "tfmq", "gac"]
NOT_MERGED = "not-merged"  # scripts/gpu-unpack.sh's folder (in a call's logs) for files it found here already
METRICS = [("fid", "FID", 2), ("sfid", "sFID", 4), ("is_mean", "IS", 3), ("precision", "precision", 3),
           ("recall", "recall", 3)]


def load_cells(folder: str | Path) -> list[dict]:
    folder = Path(folder)
    if not folder.is_dir():
        raise GacqError(f"{folder} is not a folder of experiment results")
    cells = []
    for p in sorted(folder.rglob("*.json")):
        if NOT_MERGED in p.relative_to(folder).parts[:-1]:
            continue  # a call's copy of a cell already here, kept by gpu-unpack.sh beside its logs: not a result
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(d, dict) and d.get("schema") == CELL_SCHEMA:
            d["_path"] = str(p)
            cells.append(d)
    if not cells:
        raise GacqError(f"no experiment cell results ({CELL_SCHEMA}) under {folder}; run `gacq experiment run SPEC`")
    return cells


def _bits_key(b: str) -> tuple:
    if b == "FP":
        return (99, 99)
    w, a = b[1:].split("A")
    return (-int(w), -int(a))


def _mkey(m: str) -> tuple:
    base = m.split("+", 1)[0]  # bias-corrected / per-token / mixed-precision variants right after the plain row
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), m)


def _stat(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _fmt(values: list[float], nd: int, runs: int = 1) -> str:
    mean, std = _stat(values)
    extra = f", {runs} quantization runs" if runs > 1 else ""
    return f"{mean:.{nd}f}" if std is None else f"{mean:.{nd}f} ± {std:.{nd}f} ({len(values)} seeds{extra})"


def _qrun(c: dict) -> tuple | None:
    """Which quantization run a cell sampled: (job, commit, wall seconds) of its quantization (the base job's for
    float-activation cells), None for FP cells. Cells of one recipe requantized in another session differ."""
    q = c.get("quantize")
    if not q:
        return None
    return (q.get("job"), (q.get("commit") or "")[:7], q.get("wall_seconds"))


def _runs(g: dict) -> int:
    """Quantization runs of a pooled entry beyond one per calibration seed (0 or 1: nothing to say)."""
    runs = {_qrun(c) for c in g["cells"]} - {None}
    seeds = {_calib_seed(c) for c in g["cells"] if _qrun(c) is not None}
    return len(runs) if len(runs) > len(seeds) else 0


def aggregate(cells: list[dict]) -> dict[tuple, dict[str, Any]]:
    """Seeds of one (feature net, experiment, method, bits, steps, gac overrides) cell pooled together. Cells of one
    spec's settings whose models differ (`model_digest`: a model trained again under the same path) are never pooled:
    where a settings digest has cells of several models, each model is an experiment of its own (cells older than
    the digest field in one of their own, "model not recorded")."""
    models: dict[str, set] = defaultdict(set)
    for c in cells:
        if c.get("model_digest"):
            models[c.get("settings_digest", c["experiment"])].add(c["model_digest"])
    groups: dict[tuple, dict[str, Any]] = {}
    for c in cells:
        cell, m = c["cell"], c["metrics"]
        fn = m["feature_network"]
        gac = tuple(sorted(cell.get("gac", {}).items()))
        # cells of different specs with the same settings pool (e.g. extra seeds run by a second spec)
        digest = c.get("settings_digest", c["experiment"])
        setting = f"settings {digest}"
        if len(models[digest]) > 1:
            setting += f", model {c['model_digest'][:12]}" if c.get("model_digest") else ", model not recorded"
        draws = cell.get("gaussian_draws", 1)
        method = cell["method"] + (f" ({draws} draws)" if draws != 1 else "") \
            + (TOK if cell.get("act_granularity") == "token" else "") + (BC if cell.get("bias_correction") else "") \
            + "".join(W8 + name for name in (cell.get("w8_layers") or {})) \
            + "".join("+" + name for name in (cell.get("recipe") or {}))
        key = (f"{fn['name']} ({fn['hash']})", setting, method, cell["bits"], cell["steps"], gac)
        g = groups.setdefault(key, {"metrics": defaultdict(list), "n": set(), "seeds": [], "cells": []})
        for k, _, _ in METRICS:
            g["metrics"][k].append(float(m[k]))
        g["n"].add(m["samples"]["n"])
        g["seeds"].append(_seed_label(c))
        g["cells"].append(c)
    return groups


def _calib_seed(c: dict) -> int | None:
    """A cell's calibration seed; cells older than the field calibrated with their spec's."""
    cs = c["cell"].get("calib_seed")
    return cs if cs is not None else (c.get("settings") or {}).get("calib", {}).get("seed")


def _seed_label(c: dict) -> str:
    """A cell's sampling seed, plus `/cs<n>` when it was calibrated with another seed than its spec's."""
    cs = c["cell"].get("calib_seed")
    default = (c.get("settings") or {}).get("calib", {}).get("seed")
    return str(c["cell"]["seed"]) + ("" if cs is None or cs == default else f"/cs{cs}")


# two-sided 95% quantiles of Student's t, 1-30 degrees of freedom (tests compare them with scipy's)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    """Student's t quantile at 0.975 (a two-sided 95% interval) for `df` degrees of freedom: a table up to 30, the
    Cornish-Fisher expansion beyond (within 1e-4 there); scipy is only a test dependency."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_difference(a: dict[str, float], b: dict[str, float]) -> dict[str, Any] | None:
    """a − b over the seeds both have (seed label -> value): the differences, their mean, sample standard
    deviation and a 95% t interval of the mean (None with one seed); None when no seed is shared."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[k] - b[k] for k in seeds]
    mean, sd = _stat(d)
    half = None if sd is None else t975(len(d) - 1) * sd / math.sqrt(len(d))
    return {"seeds": seeds, "diffs": d, "mean": mean, "sd": sd,
            "interval": None if half is None else (mean - half, mean + half)}


def _by_seed(g: dict, metric: str) -> dict[str, float]:
    """A pooled entry's metric per seed label (the mean where one label has several cells)."""
    got: dict[str, list[float]] = defaultdict(list)
    for c in g["cells"]:
        got[_seed_label(c)].append(float(c["metrics"][metric]))
    return {k: sum(v) / len(v) for k, v in got.items()}


def _paired_section(gs: dict, labels: dict[str, str] | None = None, a: str = "gac", b: str = "tfmq") -> list[str]:
    """Method a − method b in FID, paired by sampling seed (the same initial noise), per experiment, bits and
    steps: the table that says whether a beats b beyond the seed-to-seed spread. `labels` (settings -> experiment
    names) adds an experiment column: a report over several experiments."""
    rows = []
    for (exp, m, bits, steps, gac), g in sorted(gs.items(), key=lambda kv: (-kv[0][3], _bits_key(kv[0][2]))):
        other = gs.get((exp, b, bits, steps, ()))
        if m != a or gac or other is None:
            continue
        p = paired_difference(_by_seed(g, "fid"), _by_seed(other, "fid"))
        if p is None:
            continue
        if p["interval"] is None:
            verdict = "one seed: no interval"
        elif p["interval"][1] < 0:
            verdict = f"{a} lower (better)"
        elif p["interval"][0] > 0:
            verdict = f"{b} lower (better)"
        else:
            verdict = "not distinguishable"
        n = sorted({c["metrics"]["samples"]["n"] for c in g["cells"]})
        rows.append(([labels[exp]] if labels else []) + [bits, str(steps), ",".join(map(str, n)), ",".join(p["seeds"]),
                     ", ".join(f"{x:+.2f}" for x in p["diffs"]),
                     f"{p['mean']:+.2f}" + ("" if p["sd"] is None else f" ± {p['sd']:.2f}"),
                     "" if p["interval"] is None else f"{p['interval'][0]:+.2f} to {p['interval'][1]:+.2f}", verdict])
    if not rows:
        return []
    return [f"### {a} − {b}, FID paired by sampling seed", "",
            f"Per seed that both rows sampled (the same sampling seed, so the same initial noise, and the same "
            f"calibration seed, `/cs<n>`): {a}'s FID minus {b}'s (negative: {a} better), their mean ± sample "
            "standard deviation, and a 95% Student-t interval of the mean. "
            "\"Not distinguishable\" means the interval includes 0: the seeds run do not show either method "
            "better.", ""] + _table((["experiment"] if labels else []) + ["bits", "steps", "samples", "seeds",
                                                                          "differences", "mean ± sd", "95% interval",
                                                                          "verdict"], rows) + [""]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def build(folder: str | Path, out: str | Path, title: str | None = None) -> dict[str, Any]:
    """The report of the cells under `folder` as it would be written to `out`, without writing anything: the
    markdown lines and what its files need (`md`, `plot_rows`, `profiles`, `grids`). Over several experiments
    (settings) each table names the experiment of its rows."""
    cells = load_cells(folder)
    groups = aggregate(cells)
    out = Path(out)
    md: list[str] = [f"# {title or 'Experiment results'}", "",
                     f"Rendered by `gacq report {folder} --out {out}` from {len(cells)} cell result(s). "
                     "Each cell JSON under the results folder holds its command, commit, machine and wall "
                     "times. Seeds of the same cell are pooled: mean ± sample standard deviation. Seeds are "
                     "sampling seeds; `/cs<n>` marks a run calibrated (trajectories and reconstruction) with "
                     "seed n instead of the spec's. Where the seeds of one cell sampled more than one quantization "
                     "run of the same recipe and calibration seed (a checkpoint requantized in a later GPU session), the count "
                     "says so: that spread then holds the run-to-run variation of the quantization (GPU "
                     "non-determinism, code changes between the commits) as well as the sampling seeds'.", ""]
    by_net: dict[str, dict] = defaultdict(dict)
    for k, g in groups.items():
        by_net[k[0]][k[1:]] = g
    plot_rows = []
    for net, gs in by_net.items():
        note = next(iter(gs.values()))["cells"][0]["metrics"]["feature_network"].get("note", "")
        md += [f"## Feature network: {net}", "", f"_{note}_" if note else "", ""]
        names: dict[str, set] = defaultdict(set)
        for k, g in gs.items():
            names[k[0]].update(c["experiment"] for c in g["cells"])
        # the experiments (settings) of this feature network: a column of their own where there are several
        labels = {exp: ", ".join(sorted(n)) for exp, n in names.items()} if len(names) > 1 else None
        if labels:  # experiment names that several settings (or models) share also name their settings
            seen = defaultdict(int)
            for lab in labels.values():
                seen[lab] += 1
            labels = {exp: lab if seen[lab] == 1 else f"{lab} ({exp})" for exp, lab in labels.items()}

        def exp_label(exp: str) -> str:  # "" in a report of one experiment
            return labels[exp] if labels else ""

        def exp_col(exp: str) -> list[str]:
            return [labels[exp]] if labels else []

        exp_head = ["experiment"] if labels else []
        base = {k: g for k, g in gs.items() if not k[4]}
        for steps in sorted({k[3] for k in base}, reverse=True):
            sel = {k: g for k, g in base.items() if k[3] == steps}
            for exp in sorted({k[0] for k in sel}):
                mine = {k: g for k, g in sel.items() if k[0] == exp}
                bits = sorted({k[2] for k in mine if k[2] != "FP"}, key=_bits_key)
                methods = sorted({k[1] for k in mine}, key=_mkey)
                n = sorted({n for g in mine.values() for n in g["n"]})
                here = sorted({c["experiment"] for g in mine.values() for c in g["cells"]})
                md += [f"### FID, {steps} sampling steps ({', '.join(here)}: {exp}; "
                       f"{', '.join(map(str, n))} samples per seed)", ""]
                if min(n) < 10000:
                    md += ["FID from fewer than 10,000 samples is biased upwards: compare only at equal counts.", ""]
                cols = (["FP"] if "fp" in methods else []) + bits
                rows = []
                for m in methods:
                    row = [m]
                    for b in cols:
                        g = mine.get((exp, m, b, steps, ())) if (b == "FP") == (m == "fp") else None
                        row.append(_fmt(g["metrics"]["fid"], 2, _runs(g)) if g else "")
                        if g:
                            plot_rows.append(((net, exp_label(exp), steps), m, b,
                                              *_stat(g["metrics"]["fid"])))
                    rows.append(row)
                md += _table(["method"] + cols, rows) + [""]
        md += ["### Every cell", ""]
        rows = []
        for (exp, m, b, steps, gac), g in sorted(gs.items(), key=lambda kv: (exp_label(kv[0][0]), kv[0][0],
                                                                             -kv[0][3], _mkey(kv[0][1]),
                                                                             _bits_key(kv[0][2]), kv[0][4])):
            q = g["cells"][0].get("quantize") or {}
            label = m + ("".join(f" {k}={v}" for k, v in gac))
            if q.get("float_acts"):
                label += f" (W/A checkpoint {q['weights_from']}, float acts)"
            rows.append(exp_col(exp) + [label, b, str(steps), ",".join(sorted(g["seeds"])),
                                        ",".join(map(str, sorted(g["n"])))] +
                        [_fmt(g["metrics"][k], nd, _runs(g)) for k, _, nd in METRICS])
        md += _table(exp_head + ["method", "bits", "steps", "seeds", "samples"] + [h for _, h, _ in METRICS],
                     rows) + [""]
        md += _paired_section(gs, labels)
        cost = {}
        for (exp, *_), g in gs.items():
            for c in g["cells"]:
                q = c.get("quantize")
                if q and not q.get("float_acts"):
                    cost[(exp, *_qrun(c))] = (q, bool((c.get("machine") or {}).get("gpu")))
        if cost:
            md += ["### Calibration cost (one quantization job each; wall time includes calibration-set loading)",
                   ""]
            n_runs = defaultdict(int)
            for exp, job, _, _ in cost:
                n_runs[(exp, job)] += 1
            rows = [exp_col(exp) + [job + (f" (run at {commit or '?'})" if n_runs[(exp, job)] > 1 else ""),
                                    _cost_work(q), f"{q['wall_seconds']:.0f}" if q.get("wall_seconds") is not None
                                    else "", _cost_peak(q, on_gpu)]
                    for (exp, job, commit, _), (q, on_gpu) in sorted(
                        cost.items(), key=lambda kv: (exp_label(kv[0][0]),) + tuple(map(str, kv[0][1:])))]
            md += _table(exp_head + ["job", "work", "wall s", "peak GPU GiB"], rows) + [""]
        abl = {k: g for k, g in gs.items() if k[4]}
        if abl:
            md += ["### GAC ablations (default = the gac row of the table above with the same bits and steps)", ""]
            rows = []
            for (exp, m, b, steps, gac), g in sorted(abl.items(), key=lambda kv: (exp_label(kv[0][0]),
                                                                                   kv[0][2], kv[0][3], kv[0][4])):
                d = gs.get((exp, m, b, steps, ()))
                rows.append(exp_col(exp) + [", ".join(f"{k}={v}" for k, v in gac), b, str(steps),
                                            _fmt(g["metrics"]["fid"], 2, _runs(g)),
                                            _fmt(d["metrics"]["fid"], 2, _runs(d)) if d else "not run"])
            md += _table(exp_head + ["override", "bits", "steps", "FID", "default FID"], rows) + [""]
    if plot_rows:
        md += [f"![FID per method and bit width]({out.stem}_fid.png)", ""]
    profiles = _diag_profiles(Path(folder))
    if profiles:
        md += _diag_section(profiles, f"{out.stem}_gac_weights.png")
    grids = [(c["cell"]["id"], Path(c["_path"]).parent.parent / c["grid"]) for c in cells if c.get("grid")]
    grids = [(cid, p) for cid, p in grids if p.is_file()]  # a grid not kept beside its cell: no broken image
    return {"cells": len(cells), "groups": len(groups), "md": md, "plot_rows": plot_rows, "profiles": profiles,
            "grids": grids}


def render(folder: str | Path, out: str | Path, title: str | None = None) -> dict:
    """Write the markdown report `out`, `<out stem>.html`, `<out stem>_fid.png` and, where GAC's diagnostics are in
    the folder, `<out stem>_gac_weights.png` next to it."""
    from .plots import plot_gac_profiles
    from .utils import atomic_path

    out = Path(out)
    rep = build(folder, out, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    png, diag_png = out.with_name(out.stem + "_fid.png"), out.with_name(out.stem + "_gac_weights.png")
    images = []
    if rep["plot_rows"]:
        _plot(rep["plot_rows"], png)
        images.append((png, "FID per method and bit width"))
    if rep["profiles"]:
        where = [w for w, _ in rep["profiles"]]
        plot_gac_profiles([p for _, p in rep["profiles"]], diag_png,
                          panels=where if len(set(where)) > 1 else None)  # several folders: a panel each
        images.append((diag_png, "GAC's learned sample weights per sampling step"))
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(rep["md"]) + "\n")
    page = out.with_suffix(".html")
    with atomic_path(page) as tmp:
        tmp.write_text(_html(rep["md"], images, rep["grids"], page.parent))
    return {"cells": rep["cells"], "groups": rep["groups"], "markdown": str(out), "html": str(page),
            "plot": str(png) if rep["plot_rows"] else None, "diagnostics": str(diag_png) if rep["profiles"] else None}


def _cost_peak(q: dict, on_gpu: bool) -> str:
    if q.get("peak_gpu_memory_bytes"):
        gib = f"{q['peak_gpu_memory_bytes'] / 2**30:.2f}"
        runs = q.get("wall_seconds_runs") or []
        # resumed: only the last run's peak unless its resume points logged the earlier runs' peaks
        if len(runs) > 1 and q.get("peak_gpu_memory_of") != "all runs":
            return f"{gib} (last of {len(runs)} runs)"
        return gib
    return "not recorded" if on_gpu else "n/a (CPU)"


def _cost_work(q: dict) -> str:
    base, w8 = q.get("bias_corrected_from"), q.get("w8_from")
    if not base and not w8:
        return "quantization"
    sec = q.get("quantize_seconds_of_base")
    work = f"bias correction of {base['checkpoint']}" if base else \
        f"8-bit weights for {len(w8['layers'])} layer(s) of {w8['checkpoint']}"
    return work + (f" (base: {sec:.0f} s)" if sec else "")


def _diag_profiles(folder: Path) -> list[tuple[str, dict]]:
    """GAC's learned-weight profiles the experiment runner wrote (`diagnostics/<job>.json`) in `folder` itself or in
    any experiment results folder under it (one with `cells/`), each with that folder's path relative to `folder`."""
    dirs = [folder / "diagnostics"] if (folder / "diagnostics").is_dir() else []
    dirs += sorted(d for d in folder.rglob("diagnostics")
                   if d.is_dir() and d.parent != folder and (d.parent / "cells").is_dir()
                   and NOT_MERGED not in d.relative_to(folder).parts)
    profiles = []
    for d in dirs:
        for f in sorted(d.glob("*.json")):
            try:
                p = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise GacqError(f"{f} is not readable JSON ({e}); delete it and rerun `gacq experiment diagnostics`") \
                    from e
            if "mean_over_blocks" in p:
                profiles.append((d.parent.relative_to(folder).as_posix(), p))
    return profiles


def _diag_section(profiles: list[tuple[str, dict]], png_name: str) -> list[str]:
    """The diagnostics section: GAC's learned sample weights per sampling step of every gac checkpoint whose
    profile the experiment runner wrote, as a table (a folder column where they come from several) and one plot."""
    several = len({where for where, _ in profiles}) > 1
    md = ["## Diagnostics: GAC's learned sample weights", "",
          "Per gac checkpoint, from its `gac_weights.safetensors` (`gacq.diagnostics.gac_weight_profile`): the mean "
          "weight of each sampling step's training samples relative to uniform (1), averaged over blocks, and the "
          "effective sample size over the training samples (ESS / N, 1 = uniform weights). Step 0 is the first "
          "(noisiest) sampling step. The profiles (`diagnostics/<job>.json`, each with its checkpoint's commit) are "
          "written by `gacq experiment run` for the checkpoints it makes or uses, or by `gacq experiment "
          "diagnostics SPEC` for checkpoints in the spec's work folder.", ""]
    rows = []
    for where, p in profiles:
        ess = sorted(b["ess_over_n"] for b in p["blocks"].values())
        m = p["mean_over_blocks"]
        rows.append(([where] if several else []) +
                    [p["job"], f"W{p['wbits']}A{p['abits'] or 32}", str(len(p["blocks"])), f"{ess[0]:.3f}",
                     f"{ess[len(ess) // 2]:.3f}", f"{m[0]:.3f}", f"{m[-1]:.3f}", f"{min(m):.3f}–{max(m):.3f}",
                     "recorded" if p["step_source"].startswith("recorded") else "inferred (older checkpoint)"])
    md += _table((["folder"] if several else []) +
                 ["job", "bits", "blocks", "ESS/N min", "ESS/N median", "first step", "last step", "range over steps",
                  "steps"], rows) + ["", f"![GAC's learned sample weights per sampling step]({png_name})", ""]
    return md


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .utils import save_figure

    # a panel per (feature network, experiment label, step count); the label is "" in a report of one experiment
    panels = sorted({r[0] for r in rows}, key=lambda p: (p[0], p[1], -p[2]))
    quantized = [p for p in panels if any(r[0] == p and r[1] != "fp" for r in rows)]
    panels = quantized or panels  # a panel with FP alone says nothing about quantization
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        sel = [r for r in rows if r[0] == panel]
        bits = sorted({r[2] for r in sel if r[2] != "FP"}, key=_bits_key)
        methods = sorted({r[1] for r in sel if r[1] != "fp"}, key=_mkey)
        width = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            xs, ys, es = [], [], []
            for j, b in enumerate(bits):
                r = next((r for r in sel if r[1] == m and r[2] == b), None)
                if r:
                    xs.append(j + i * width)
                    ys.append(r[3])
                    es.append(r[4] or 0.0)
            # points, not bars: the axis then spans the figures instead of starting at 0, where differences of
            # a few tenths (most quantized cells against each other) would be invisible
            ax.errorbar(xs, ys, yerr=es, fmt="o", ms=6, capsize=3, label=m)
            for x, y in zip(xs, ys) if len(methods) <= 4 else ():  # more labels than that overlap
                ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
        fp = next((r for r in sel if r[1] == "fp"), None)
        if fp is not None:
            ax.axhline(fp[3], color="k", ls="--", lw=1, label=f"FP {fp[3]:.2f}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(bits))], bits)
        ax.set_xlim(-0.5 * width - 0.2, len(bits) - 0.2)
        values = [r[3] for r in sel if r[3] > 0]
        if values and max(values) > 3 * min(values):  # a collapsed cell would flatten the others on a linear axis
            ax.set_yscale("log")
        ax.margins(y=0.15)
        ax.set_ylabel(f"FID on {panel[0].split()[0]} features (lower is better)")
        spread = any(r[4] for r in sel)
        note = "" if spread else "one seed each: no spread shown; the axis does not start at 0"
        if panel[1]:  # a report over several experiments: the experiment first, each part on a line of its own
            ax.set_title("\n".join([panel[1], f"{panel[2]} sampling steps"] + ([f"({note})"] if note else [])),
                         fontsize=9)
        else:
            ax.set_title(f"{panel[2]} sampling steps" + (f" ({note})" if note else ""), fontsize=9 if note else None)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def _html(md: list[str], images: list[tuple[Path, str]], grids, root: Path) -> str:
    body, in_table = [], False
    for line in md:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                tag = "th"
            else:
                tag = "td"
            body.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("!["):
            continue
        elif line:
            body.append(f"<p>{html.escape(line.strip('_'))}</p>")
    if in_table:
        body.append("</table>")
    for png, alt in images:
        body.append(f'<img src="{html.escape(png.name)}" alt="{html.escape(alt)}" style="max-width:100%">')
    if grids:
        body.append("<h2>Sample grids</h2><div>")
        for cid, p in grids:
            rel = os.path.relpath(p, root)
            body.append(f'<figure style="display:inline-block;margin:4px"><img src="{html.escape(rel)}" width="260">'
                        f"<figcaption>{html.escape(cid)}</figcaption></figure>")
        body.append("</div>")
    style = "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}" \
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>gacq results</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>\n"
