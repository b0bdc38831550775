"""`gacq experiment`: run a grid of (method, bit width, sampler, seed) cells from a TOML spec.

Each cell is: calibrate (one all-steps calibration set per sampler, shared by every method: each
recipe cuts its own timestep selection out of it), quantize, sample, evaluate. A finished cell is a
JSON file `<results>/cells/<cell id>.json`; rerunning the spec skips finished cells and resumes
unfinished ones (quantization resumes per block, sampling per shard), so a table can be built over
many short GPU calls. `--parallel N` runs cells as up to N processes at once (small models leave a
GPU mostly idle): the first cell of each quantization job quantizes, then every further cell that
samples the same checkpoint gets a process of its own. With several GPUs visible, the N process
slots are spread over them round-robin (one GPU per process).

A spec (every key but `[[grid]]` optional; defaults shown)::

    name = "table"                      # results go to results/experiments/<name>
    model = ""                          # model folder / hub id; "" = the bundled CIFAR-10 model
    work = ""                           # checkpoints and samples; "" = runs/experiments/<name>
    results = ""                        # cell JSONs; "" = results/experiments/<name>
    device = "auto"
    matmul_tf32 = false                 # CUDA: float32 matrix products in TF32 (below)
    [calib]   trajectories = 256, seed = 0, batch_size = 256,
              record_steps = 20   # uniform selection / tfmq weight subset (all steps when fewer)
    [quantize] preset = "common", iters = 20000, act_iters = 5000, gac_meta_iters = 100,
               recon_batch = 32, seed = 0
    [sample]  scheduler = "ddim", steps = 100, eta = 0.0, num = 10000, batch_size = 1000,
              timestep_spacing = "leading", seeds = [0],
              guidance_scale = 1.0   # class-conditional models: balanced labels, this guidance
                                     # (also in the calibration sampler, which then records both branches)
    [eval]    features = "cifar10", ref = "", inception_weights = ""
    [[grid]]  methods = ["fp", "tfmq", "gac"], bits = ["W4A8", "W4A32"], steps = [100], seeds = [0],
              gac = {tau = [0.5, 1.0]},    # optional: a product over GAC hyperparameters
              calib_seeds = [0, 1, 2],     # optional: calibration seeds (below)
              bias_correction = [false, true],  # optional: output bias correction (below)
              gaussian_draws = [1, 20]     # optional, ptq4dm only: calibration at equal data (below)
              w8_layers = {sc = ["up_blocks.3.resnets.*.conv_shortcut"]}  # optional: 8-bit weights (below)
              recipe = {lsq = {act_mode = "lsq"}}  # optional: recipe overrides (below)

`seeds` are sampling seeds (the noise of the 10k samples). `calib_seeds` repeat the whole
quantization with another seed: the calibration trajectories and the reconstruction (minibatch
order, GAC's scores) both take it, so their spread is the spread of the method, not of the
sampler. A cell whose calibration seed equals `[calib] seed` and `[quantize] seed` (both 0 by
default) is the spec's ordinary cell; others get `_cs<seed>` in their id and job.

`bias_correction = true` (or a list) adds output bias correction (`gacq.quant.bias_correction`)
to the quantization; such cells and jobs get `_bc` in their id. When the same job without it has a
checkpoint in the work folder, the corrected checkpoint is made from that one
(`gacq.quant.api.bias_correct_checkpoint`: one pass over the calibration set, no requantization),
and its cell JSON names it (`bias_corrected_from`); otherwise the job quantizes from scratch. Only
cells with quantized activations take it (a W4A32 cell samples a W/A checkpoint with float
activations, and the correction is measured with the activations quantized).

`gaussian_draws = d` records each calibration trajectory at d Gaussian-drawn steps instead of one
(`CalibDataConfig.draws`), for methods with PTQ4DM's Gaussian selection: with d = `record_steps` they
calibrate on as many samples as the uniform selection (5,120 at 256 trajectories and 20 steps, against
256 with PTQ4DM's one draw). Such cells and jobs get `_gd<d>` in their id. Not part of PTQ4DM.

`[quantize] smooth = a` (optional) quantizes every cell with activation smoothing at strength a
(`gacq quantize --smooth`, `gacq.quant.smooth`; not part of any paper's method). Every quantized cell of such a
spec must quantize its activations (no W/A32 cells). It enters the settings digest only when given.

`act_granularity = ["tensor", "token"]` in a grid (optional; default "tensor") also makes cells whose quantized
Linear layers quantize their inputs per token, dynamically (`gacq quantize --act-granularity token`,
`QuantConfig.act_granularity`; not part of any paper's method). Such cells and jobs get `_tok` in their id; they
need quantized activations (no W/A32 bits in that grid).

`recipe = {NAME = {act_mode = "lsq", split_shortcuts = true}, ...}` in a grid (optional) also makes cells whose
recipe takes those overrides (`gacq quantize --act-mode / --split-shortcuts`, `QuantConfig.act_mode` /
`split_shortcuts`): ablations across the methods' recipes, e.g. TFMQ-DM with Q-Diffusion's learned activation step
sizes. Such cells and jobs get `_r<NAME>` in their id, and their report rows read `<method>+<NAME>`. NAME is letters
and digits; one name means the same overrides in every grid of the spec. `fmt = "fp8"` in a recipe quantizes to
FP8 E4M3 instead of integer grids (`gacq quantize --format fp8`: W8A8 or W8A32, methods without learned rounding);
`act_fmt = "fp8"` only the inputs (`--act-format fp8`: e.g. W4 weights of any method with FP8 inputs).

Cells of more than 10,000 samples (e.g. `[sample] num = 50000`) are sampled in parts of 5,000 (`[sample] part_size`
sets the part size for any cell count: a positive multiple of 10), each reduced to its feature statistics in
work/parts/<cell>/ as soon as it is drawn; a rerun samples only the parts without statistics, so a 50,000-sample cell
can be made over several 10-minute device calls (the statistics, a few MB a part, travel; the images do not). The
merged statistics equal one pass's up to float rounding; precision/recall then use a seeded uniform subset of 10,000
samples (`gacq.metrics.stats.pr_rows`) instead of one pass's reservoir. Not part of the settings digest.
`gacq experiment run --deadline SECONDS` starts no part that would not end by then (judged by the last part this
run made, else the longest one recorded) and exits with code 3: a device call of fixed length then returns early
instead of losing a part cut at its end (session 39 lost about 120 s and 55 s of three cells' sampling so).
`gacq experiment run --parts 8-10` samples only those parts (1-based, as the runner's messages count them) and leaves
the others to other runs: a cell's parts can then be drawn on several machines, or in device calls that do not carry
the earlier parts' statistics, and the run that finds all of a cell's parts in its work folder merges them
(sampling nothing). `--parts none` quantizes and samples no image. Cells it leaves unfinished stop with exit code 3.

`[sample] compile = true` (optional) samples with `gacq sample --compile` (torch.compile, and one CUDA graph per batch
replayed per step on CUDA): faster, images close to but not bitwise equal to eager ones. Each cell's JSON records it,
and a cell's parts never mix the two (a part made otherwise is refused). Not part of the settings digest: compiled and
eager cells of one spec stay comparable, as with batch sizes.

`matmul_tf32 = true` lets CUDA run float32 matrix products (linear layers, attention) in TF32 for the whole
run: calibration, quantization and sampling, in every process. PyTorch already runs float32 convolutions in TF32
by default (`torch.backends.cudnn.allow_tf32`), so a UNet's cost is mostly TF32 anyway; a transformer's is
matrix products, which otherwise run in full float32 at an eighth of the speed. TF32 keeps 10 mantissa bits: its
rounding is far below a quantization step at 8 bits or fewer. Recorded in each cell's settings (when on) and
in its `sample` record; no effect on the CPU.

`w8_layers = {NAME = [PATTERN, ...], ...}` in a grid makes, for each named pattern list, cells whose matching layers
have 8-bit weights (mixed precision; `QuantConfig.w8_layers`, `gacq.quant.api.w8_checkpoint`; not part of any
paper's method). Such cells and jobs get `_w8<NAME>` in their id. They are always derived from the same job without
the patterns (its checkpoint, quantized first when the work folder lacks it, and then reused by that job's own
cells): the chosen layers take the float weights rounded to nearest on an 8-bit grid, every other layer stays as in
that checkpoint. So the pair differs in those layers' weights only. Not with bias_correction in the same grid.

"W4A32" cells are the weight-only model. When the spec also has the same recipe with quantized
activations (e.g. W4A8), the W4A32 cell samples that checkpoint with float activations (its weight
stage runs with float activations, so its weights are the W-only model's; tested in
tests/test_methods.py), and says so in its JSON (`weights_from`); otherwise it quantizes at W4A32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GacqError

CELL_SCHEMA = "gacq-experiment-cell/1"
GAC_KEYS = {"tau": float, "val_fraction": float, "groups": int, "meta_iters": int, "inner_lr": float,
            "meta_lr": float, "init_score": float, "batch_size": int, "meta_optimizer": str}
_SECTIONS = {
    "calib": {"trajectories": 256, "seed": 0, "batch_size": 256, "record_steps": 20},
    "quantize": {"preset": "common", "iters": 20000, "act_iters": 5000, "gac_meta_iters": 100, "recon_batch": 32,
                 "seed": 0},
    "sample": {"scheduler": "ddim", "steps": 100, "eta": 0.0, "num": 10000, "batch_size": 1000,
               "timestep_spacing": "leading", "seeds": [0], "guidance_scale": 1.0},
    "eval": {"features": "cifar10", "ref": "", "inception_weights": ""},
}
# optional keys: absent unless given, so that the settings digests of specs without them stay what they were
_OPTIONAL = {"quantize": {"smooth"}, "sample": {"part_size", "compile"}}
# cells of more samples than this sample in parts of PART_SIZE images unless [sample] part_size says otherwise
# (`_sample_in_parts`): each part a few minutes of GPU time, its feature statistics a few MB, so that a cell of 50,000
# samples can be made over several 10-minute device calls
PARTS_ABOVE, PART_SIZE = 10000, 5000
_TOP = {"name", "model", "work", "results", "device", "matmul_tf32", "grid", *_SECTIONS}
_GRID_KEYS = {"methods", "bits", "steps", "seeds", "gac", "calib_seeds", "bias_correction", "gaussian_draws",
              "act_granularity", "w8_layers", "recipe"}
# QuantConfig's recipe overrides a grid's `recipe` may set (fmt: the number format, e.g. recipe = {fp8 = {fmt = "fp8"}})
RECIPE_KEYS = {"act_mode": str, "split_shortcuts": bool, "fmt": str, "act_fmt": str}


def parse_bits(text: str) -> tuple[int, int | None]:
    """'W4A8' -> (4, 8); 'W4A32' -> (4, None) (float activations)."""
    t = text.strip().upper()
    try:
        w, a = t[1:].split("A")
        if not t.startswith("W"):
            raise ValueError
        w, a = int(w), int(a)
    except ValueError:
        raise GacqError(f"bit width {text!r} is not of the form W<bits>A<bits>, e.g. W4A8 or W4A32") from None
    if not 2 <= w <= 8 or not (2 <= a <= 8 or a == 32):
        raise GacqError(f"bit width {text!r}: weights take 2-8 bits, activations 2-8 or 32 (float)")
    return w, None if a == 32 else a


def bits_label(wbits: int | None, abits: int | None) -> str:
    return "FP" if wbits is None else f"W{wbits}A{abits if abits is not None else 32}"


@dataclass(frozen=True)
class Cell:
    """One table cell: a model (FP or method at bits, with GAC overrides), a sampler step count and a
    sampling seed; `cseed` is the calibration seed when it is not the spec's (None: the spec's)."""

    method: str
    wbits: int | None
    abits: int | None
    steps: int
    seed: int
    gac: tuple[tuple[str, Any], ...] = ()
    cseed: int | None = None
    bc: bool = False
    draws: int = 1  # Gaussian timestep draws per calibration trajectory (PTQ4DM's selection; 1 = its own)
    gran: str = "tensor"  # the quantized Linear inputs' grids: "tensor" (calibrated) or "token" (dynamic)
    w8: tuple[str, tuple[str, ...]] | None = None  # (name, layer patterns) given 8-bit weights (w8_layers)
    recipe: tuple[str, tuple[tuple[str, Any], ...]] | None = None  # (name, sorted overrides) of a grid's `recipe`

    @property
    def bits(self) -> str:
        return bits_label(self.wbits, self.abits)

    def _suffix(self) -> str:
        return "".join(f"_{k}{v:g}" if isinstance(v, float) else f"_{k}{v}" for k, v in self.gac) \
            + ("" if self.draws == 1 else f"_gd{self.draws}") \
            + ("" if self.cseed is None else f"_cs{self.cseed}") + ("_tok" if self.gran == "token" else "") \
            + ("_bc" if self.bc else "") + (f"_w8{self.w8[0]}" if self.w8 else "") \
            + (f"_r{self.recipe[0]}" if self.recipe else "")

    @property
    def id(self) -> str:
        if self.method == "fp":
            return f"fp_steps{self.steps}_seed{self.seed}"
        return f"{self.method}_{self.bits.lower()}{self._suffix()}_steps{self.steps}_seed{self.seed}"

    def quant_job(self, abits: int | None) -> str:
        return f"{self.method}_{bits_label(self.wbits, abits).lower()}{self._suffix()}_steps{self.steps}"


@dataclass
class ExperimentSpec:
    name: str
    path: Path
    text_sha256: str
    model: str | None
    work: Path
    results: Path
    device: str
    calib: dict
    quantize: dict
    sample: dict
    eval: dict
    cells: list[Cell] = field(default_factory=list)
    matmul_tf32: bool = False

    @property
    def cell_dir(self) -> Path:
        return self.results / "cells"


# section keys that count things: at least 1 (every other integer key at least 0)
_POSITIVE = {"trajectories", "batch_size", "record_steps", "recon_batch", "steps", "num"}


def _is_int(v) -> bool:
    """An integer as TOML gives it (a bool is not one, though Python counts it so)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _check_value(name: str, key: str, v, default, where: str) -> None:
    """A section value of the default's type (an integer where the default is one, a number for a float, ...),
    in range; the value itself is kept as written (it enters the settings digest)."""
    what = f"{where}: [{name}] {key} = {v!r}"
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise GacqError(f"{what}: must be true or false")
    elif isinstance(default, int):
        if not _is_int(v):
            raise GacqError(f"{what}: must be an integer, e.g. {default}")
        if v < (1 if key in _POSITIVE else 0):
            raise GacqError(f"{what}: must be at least {1 if key in _POSITIVE else 0}")
    elif isinstance(default, float):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise GacqError(f"{what}: must be a number, e.g. {default}")
        if key == "eta" and v < 0:
            raise GacqError(f"{what}: must be at least 0")
    elif isinstance(default, str) and not isinstance(v, str):
        raise GacqError(f"{what}: must be a string, e.g. {default!r}")


def _section(raw: dict, name: str, where: str) -> dict:
    got = raw.get(name, {})
    if not isinstance(got, dict):
        raise GacqError(f"{where}: [{name}] must be a table")
    known = set(_SECTIONS[name]) | _OPTIONAL.get(name, set())
    unknown = set(got) - known
    if unknown:
        raise GacqError(f"{where}: unknown key(s) {sorted(unknown)} in [{name}]; known: {sorted(known)}")
    for key, v in got.items():
        if key in _SECTIONS[name]:
            _check_value(name, key, v, _SECTIONS[name][key], where)
    return {**_SECTIONS[name], **got}


def _ints(v, what: str, where: str, minimum: int) -> list[int]:
    """A grid's list of integers (one integer alone is a list of one), each at least `minimum`."""
    vals = _as_list(v, what, where)
    if any(not _is_int(x) or x < minimum for x in vals):
        raise GacqError(f"{where}: {what} must be integers of at least {minimum} (or a list of them); got {v!r}")
    return vals


def _as_list(v, what: str, where: str) -> list:
    v = v if isinstance(v, list) else [v]
    if not v:
        raise GacqError(f"{where}: {what} is an empty list")
    return v


def load_spec(path: str | Path, results: str | Path | None = None) -> ExperimentSpec:
    """Parse and validate a spec file; expands its grids into cells (duplicates dropped, order kept).
    `results` overrides the spec's results folder."""
    from .quant.methods import METHODS

    path = Path(path)
    if not path.is_file():
        raise GacqError(f"experiment spec {path} does not exist")
    text = path.read_bytes()
    try:
        raw = tomllib.loads(text.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise GacqError(f"{path} is not valid TOML: {e}") from None
    unknown = set(raw) - _TOP
    if unknown:
        raise GacqError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(_TOP)}")
    name = str(raw.get("name", path.stem))
    sections = {s: _section(raw, s, str(path)) for s in _SECTIONS}
    seeds0 = _ints(sections["sample"]["seeds"], "[sample] seeds", str(path), 0)
    ps = sections["sample"].get("part_size")
    if ps is not None and (not _is_int(ps) or ps < 10 or ps % 10):
        raise GacqError(f"{path}: [sample] part_size must be a positive multiple of 10 (the Inception Score's "
                        f"splits), e.g. 5000; got {ps!r}")
    if not isinstance(sections["sample"].get("compile", False), bool):
        raise GacqError(f"{path}: [sample] compile must be true or false, got {sections['sample']['compile']!r}")
    grids = raw.get("grid")
    if not isinstance(grids, list) or not grids:
        raise GacqError(f"{path}: no [[grid]] tables; add e.g. [[grid]] methods = [\"fp\", \"gac\"] bits = [\"W4A8\"]")
    cells: dict[str, Cell] = {}
    w8_seen: dict[str, tuple[str, ...]] = {}
    recipe_seen: dict[str, tuple] = {}
    for gi, g in enumerate(grids):
        where = f"{path} [[grid]] #{gi + 1}"
        bad = set(g) - _GRID_KEYS
        if bad:
            raise GacqError(f"{where}: unknown key(s) {sorted(bad)}; known: {sorted(_GRID_KEYS)}")
        methods = _as_list(g.get("methods", []), "methods", where)
        for m in methods:
            if m != "fp" and m not in METHODS:
                raise GacqError(f"{where}: unknown method {m!r}; choose fp or one of {', '.join(METHODS)}")
        bits = [parse_bits(b) for b in _as_list(g.get("bits", ["W4A8"]), "bits", where)]
        steps = _ints(g.get("steps", sections["sample"]["steps"]), "steps", where, 1)
        seeds = _ints(g.get("seeds", seeds0), "seeds", where, 0)
        gac = g.get("gac", {})
        if not isinstance(gac, dict) or set(gac) - set(GAC_KEYS):
            raise GacqError(f"{where}: gac must be a table with keys among {sorted(GAC_KEYS)}")
        gkeys = sorted(gac)
        gvals = [[GAC_KEYS[k](v) for v in _as_list(gac[k], f"gac.{k}", where)] for k in gkeys]
        cseeds = g.get("calib_seeds")
        if cseeds is None:
            cseeds = [None]
        else:
            try:
                cseeds = [int(s) for s in _as_list(cseeds, "calib_seeds", where)]
            except (TypeError, ValueError):
                raise GacqError(f"{where}: calib_seeds must be a list of integers, e.g. [0, 1, 2]") from None
            if any(s < 0 for s in cseeds):
                raise GacqError(f"{where}: calib_seeds must be non-negative")
            spec_seed = sections["calib"]["seed"]
            # the spec's own seed is its ordinary cell (when both sections use it)
            cseeds = [None if s == spec_seed == sections["quantize"]["seed"] else s for s in cseeds]
        bcs = _as_list(g.get("bias_correction", [False]), "bias_correction", where)
        if any(not isinstance(b, bool) for b in bcs):
            raise GacqError(f"{where}: bias_correction must be true, false or a list of them")
        draws = _as_list(g.get("gaussian_draws", [1]), "gaussian_draws", where)
        if any(not _is_int(d) or d < 1 for d in draws):
            raise GacqError(f"{where}: gaussian_draws must be a positive integer or a list of them")
        if draws != [1]:
            from .quant.methods import method_spec

            other = [m for m in methods if m == "fp" or
                     method_spec(m, sections["quantize"]["preset"]).calib_selection != "gaussian"]
            if other:
                raise GacqError(f"{where}: gaussian_draws applies to methods that calibrate on Gaussian-drawn "
                                f"timesteps (ptq4dm), not {other}")
        grans = _as_list(g.get("act_granularity", ["tensor"]), "act_granularity", where)
        if any(x not in ("tensor", "token") for x in grans):
            raise GacqError(f"{where}: act_granularity must be 'tensor', 'token' or a list of them, not {grans!r}")
        w8s = _w8_sets(g.get("w8_layers"), where, w8_seen)
        if w8s != [None] and (True in bcs or "fp" in methods or any(w == 8 for w, _ in bits)):
            raise GacqError(f"{where}: w8_layers gives chosen layers of a low-bit checkpoint 8-bit weights: not with "
                            "bias_correction, method fp or W8 bits in the same grid")
        recipes = _recipe_sets(g.get("recipe"), where, recipe_seen)
        if recipes != [None] and "fp" in methods:
            raise GacqError(f"{where}: recipe overrides a quantization recipe: not with method fp in the same grid")
        for m, (w, a), st, sd, gv, cs, bc, dr, gr, w8, rc in itertools.product(
                methods, bits, steps, seeds, itertools.product(*gvals), cseeds, bcs, draws, grans, w8s, recipes):
            if m == "fp":
                c = Cell("fp", None, None, st, sd)
            else:
                if gkeys and m != "gac":
                    raise GacqError(f"{where}: gac overrides apply to method gac only, not {m!r}")
                if bc and a is None:
                    raise GacqError(f"{where}: bias_correction cells need quantized activations (W{w}A32 cells "
                                    "sample a W/A checkpoint with float activations, whose correction was measured "
                                    "with quantized ones); use bits like W4A8")
                if gr == "token" and a is None:
                    raise GacqError(f"{where}: act_granularity 'token' quantizes activations per token; W{w}A32 "
                                    "cells keep them float: use bits like W8A8 in that grid")
                if rc is not None:
                    from .quant.config import QuantConfig

                    try:  # the overrides' own checks (e.g. fsc needs every step), now rather than mid-run
                        QuantConfig(method=m, preset=sections["quantize"]["preset"], wbits=w, abits=a, **dict(rc[1]))
                    except GacqError as e:
                        raise GacqError(f"{where}: recipe.{rc[0]} with method {m}: {e}") from None
                c = Cell(m, w, a, st, sd, tuple(zip(gkeys, gv)), cs, bc, dr, gr, w8, rc)
            cells.setdefault(c.id, c)
    tf32 = raw.get("matmul_tf32", False)
    if not isinstance(tf32, bool):
        raise GacqError(f"{path}: matmul_tf32 must be true or false, not {tf32!r}")
    sm = sections["quantize"].get("smooth")
    if sm is not None:
        if isinstance(sm, bool) or not isinstance(sm, (int, float)) or not 0 <= sm <= 1:
            raise GacqError(f"{path}: [quantize] smooth must be a number in [0, 1] (SmoothQuant's strength), not {sm!r}")
        wa = sorted({c.id for c in cells.values() if c.method != "fp" and c.abits is None})
        if wa:
            raise GacqError(f"{path}: [quantize] smooth needs quantized activations, but cell(s) {wa[:3]} keep them "
                            "float (W/A32); drop those bits or the smooth key")
    base = Path(os.getcwd())
    work = Path(raw["work"]) if raw.get("work") else base / "runs" / "experiments" / name
    if results is not None:
        results = Path(results).absolute()
    elif raw.get("results"):
        results = Path(raw["results"])
    else:
        results = base / "results" / "experiments" / name
    return ExperimentSpec(name=name, path=path, text_sha256=hashlib.sha256(text).hexdigest()[:16],
                          model=raw.get("model") or None, work=work, results=results,
                          device=str(raw.get("device", "auto")), cells=list(cells.values()), matmul_tf32=tf32,
                          **sections)


def _named_tables(raw, where: str, seen: dict[str, Any], key: str, example: str, entry, what: str) -> list:
    """A grid's table of named entries (`w8_layers`, `recipe`) -> [(name, entry(name, value)), ...] ([None] when
    absent). The names go into cell ids; one name means the same entry in every grid of the spec (`seen`). `entry`
    checks one value and returns its canonical form; `what` names such a value in errors."""
    if raw is None:
        return [None]
    if not isinstance(raw, dict) or not raw:
        raise GacqError(f"{where}: {key} must be a table of named {example}")
    out = []
    for name, value in raw.items():
        if not name.isascii() or not name.isalnum():
            raise GacqError(f"{where}: {key} name {name!r} goes into cell ids: use letters and digits only")
        value = entry(name, value)
        if seen.setdefault(name, value) != value:
            raise GacqError(f"{where}: {key}.{name} differs from what another grid gave it ({seen[name]!r}): one "
                            f"name, one {what}")
        out.append((name, value))
    return out


def _w8_sets(raw, where: str, seen: dict[str, tuple[str, ...]]) -> list:
    """A grid's `w8_layers` table -> [(name, patterns), ...] ([None] when absent)."""
    def entry(name, pats):
        if not isinstance(pats, list) or not pats or not all(isinstance(p, str) and p for p in pats):
            raise GacqError(f"{where}: w8_layers.{name} must be a non-empty list of layer-name patterns")
        return tuple(pats)

    return _named_tables(raw, where, seen, "w8_layers", "layer-pattern lists, e.g. "
                         "w8_layers = {sc = [\"up_blocks.3.resnets.*.conv_shortcut\"]}", entry,
                         "pattern list")


def _recipe_sets(raw, where: str, seen: dict[str, tuple]) -> list:
    """A grid's `recipe` table -> [(name, sorted overrides), ...] ([None] when absent)."""
    def entry(name, over):
        if not isinstance(over, dict) or not over or set(over) - set(RECIPE_KEYS):
            raise GacqError(f"{where}: recipe.{name} must be a non-empty table with keys among {sorted(RECIPE_KEYS)}")
        for k, v in over.items():
            if not isinstance(v, RECIPE_KEYS[k]):
                raise GacqError(f"{where}: recipe.{name}.{k} must be a {RECIPE_KEYS[k].__name__}, not {v!r}")
        return tuple(sorted(over.items()))

    return _named_tables(raw, where, seen, "recipe", "override tables, e.g. recipe = {lsq = {act_mode = \"lsq\"}}",
                         entry, "set of overrides")


def quant_job_of(spec: ExperimentSpec, cell: Cell) -> tuple[str | None, bool, int | None]:
    """(quantization job id, float_acts, the job's activation bits) of a cell; job None for FP.

    A W-only cell reuses the spec's W/A job of the same recipe (the one with the most activation bits).
    """
    if cell.method == "fp":
        return None, False, None
    if cell.abits is None:
        donors = sorted({c.abits for c in spec.cells if c.abits is not None and c.method == cell.method
                         and c.wbits == cell.wbits and c.steps == cell.steps and c.gac == cell.gac
                         and c.cseed == cell.cseed and c.bc == cell.bc and c.gran == "tensor" and c.w8 == cell.w8
                         and c.recipe == cell.recipe})
        if donors:
            return cell.quant_job(donors[-1]), True, donors[-1]
    return cell.quant_job(cell.abits), False, cell.abits


def settings(spec: ExperimentSpec) -> dict:
    """What makes cells of different specs comparable (everything but the grid, seeds and steps)."""
    out = {"model": spec.model, "calib": spec.calib, "quantize": spec.quantize,
           "sample": {k: v for k, v in spec.sample.items()
                      if k not in ("seeds", "steps", "batch_size", "part_size", "compile")},
           "eval": spec.eval}
    if spec.matmul_tf32:  # only when on: the digests of specs without the key stay what they were
        out["matmul_tf32"] = True
    return out


def settings_digest(spec: ExperimentSpec) -> str:
    return hashlib.sha256(json.dumps(settings(spec), sort_keys=True).encode()).hexdigest()[:12]


_MODEL_DIGESTS: dict[tuple, str] = {}


def model_digest(model: str | None) -> str | None:
    """sha256 (16 hex digits) over the safetensors files of the spec's model folder (denoiser, autoencoder), or
    None when the model cannot be found here (not trained yet, a hub id not downloaded) or its folder holds no
    weights (a device call whose tree lacked the weights file and sampled only from a carried checkpoint: session 49
    recorded the digest of no files then, which every later check took for a retrained model). Cached per folder
    state."""
    from .model_paths import resolve_model_folder

    if model is not None and not Path(model).expanduser().exists():
        return None  # a hub id (resolving it would download it) or a model not trained yet
    try:
        folder, _ = resolve_model_folder(model)
    except GacqError:
        return None
    files = sorted(folder.rglob("*.safetensors"))
    return _files_digest(files, folder) if files else None


def _files_digest(files: list[Path], folder: Path) -> str:
    """sha256 (16 hex digits) over the files' names (relative to `folder`) and bytes; cached per folder state."""
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _MODEL_DIGESTS:
        h = hashlib.sha256()
        for f in files:
            h.update(f.relative_to(folder).as_posix().encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
        _MODEL_DIGESTS[key] = h.hexdigest()[:16]
    return _MODEL_DIGESTS[key]


def checkpoint_digest(qdir: Path) -> str | None:
    """sha256 (16 hex digits) of a quantized checkpoint's tensors (quantized.safetensors, float.safetensors): which
    quantization run a cell or a part was sampled from. Two runs of one job need not be equal (GPU reductions are
    not deterministic), though their folder has the same name. None when the folder holds no checkpoint."""
    files = [qdir / name for name in ("quantized.safetensors", "float.safetensors") if (qdir / name).is_file()]
    return _files_digest(files, qdir) if files else None


def sampled_from_job(spec: ExperimentSpec, job: str) -> list[str]:
    """What was sampled from quantization job `job` of this spec: its finished cells (their JSON's `quantize.job`)
    and its cells' parts in the work folder (their meta's model, `<work>/q/<job>`)."""
    found = []
    for f in sorted(spec.cell_dir.glob("*.json")) if spec.cell_dir.is_dir() else []:
        try:
            if (json.loads(f.read_text()).get("quantize") or {}).get("job") == job:
                found.append(f"cell {f.stem}")
        except (ValueError, AttributeError):  # not a cell's JSON
            continue
    model_id = _work_relative(spec, str(spec.work / "q" / job))  # as _sample_in_parts names the model of a part
    parts: dict[str, list[int]] = {}
    for meta in sorted((spec.work / "parts").glob("*/meta_*.json")):
        model = json.loads(meta.read_text()).get("model", "")
        if model == model_id or model.startswith(model_id + " "):
            parts.setdefault(meta.parent.name, []).append(int(meta.stem.split("_")[1]) + 1)
    found += [f"parts {_ranges(ks)} of {cid}" for cid, ks in parts.items()]
    return found


def _work_relative(spec: ExperimentSpec, source: str) -> str:
    """A model's name in a part's record: a checkpoint in the work folder relative to it (`<work>/q/JOB`), so that
    parts drawn on machines whose checkouts lie elsewhere (another folder, a fresh clone) are recognised."""
    work = str(spec.work)
    return source.replace(work, "<work>", 1) if source.startswith(work) else source


def _refuse_second_run(spec: ExperimentSpec, job: str) -> None:
    """Refuse to quantize `job` again when cells or parts were sampled from an earlier run of it whose checkpoint is
    gone: the new run would differ, and the table would pool two runs under one name."""
    found = sampled_from_job(spec, job)
    if found:
        shown = "; ".join(found[:6]) + (f"; and {len(found) - 6} more" if len(found) > 6 else "")
        raise GacqError(
            f"{job}: its checkpoint is not in {spec.work / 'q' / job}, but these were sampled from an earlier "
            f"quantization run of it: {shown}. Quantizing again would make another run (it need not match the "
            f"first: GPU reductions are not deterministic), and this table would pool the two. Put that run's "
            f"checkpoint back in {spec.work / 'q' / job} (scripts/gpu-dit-call.sh returns checkpoints as q.tgz), or "
            f"give a new run a spec of its own (another `name`: its own results and work folders)")


def _done(spec: ExperimentSpec, cell: Cell) -> bool:
    """A cell's result exists; one made with other settings (another spec sharing the folder), or from other model
    weights at the same path (a model retrained in place), is refused."""
    path = spec.cell_dir / f"{cell.id}.json"
    if not path.exists():
        return False
    res = json.loads(path.read_text())
    got = res.get("settings_digest")
    if got != settings_digest(spec):
        raise GacqError(f"{path} was made with other settings (digest {got}, this spec {settings_digest(spec)}); "
                        "give this spec its own `results` and `work` folders")
    made_from, now = res.get("model_digest"), model_digest(spec.model)
    if made_from is not None and now is not None and made_from != now:
        raise GacqError(f"{path} was made from other weights than the model now at {spec.model or 'the bundled model'} "
                        f"(weights digest {made_from}, now {now}): was it retrained? Move the old results folder "
                        f"({spec.results}) and work folder ({spec.work}) away, or give this spec its own")
    return True


def cell_status(spec: ExperimentSpec, cell: Cell) -> str:
    if _done(spec, cell):
        return "done"
    job = quant_job_of(spec, cell)[0]
    partial = (spec.work / "samples" / cell.id).exists() or job is not None and any(
        (spec.work / "q" / name).exists() for name in (job, f"{job}.recon-ckpt")) or cell_parts(spec, cell)
    return "started" if partial else "pending"


def part_size_of(spec: ExperimentSpec) -> int | None:
    """The images per part of the spec's cells when they sample in parts (`_sample_in_parts`), else None."""
    size = spec.sample.get("part_size", PART_SIZE if spec.sample["num"] > PARTS_ABOVE else None)
    return size if size is not None and size < spec.sample["num"] else None


def part_count(spec: ExperimentSpec) -> int | None:
    """How many parts each of the spec's cells samples in (None: they sample in one run)."""
    size = part_size_of(spec)
    return None if size is None else -(-spec.sample["num"] // size)


def cell_parts(spec: ExperimentSpec, cell: Cell) -> tuple[int, int] | None:
    """(parts whose statistics are in the work folder, parts in all) of a cell that samples in parts and has begun
    to; None otherwise (`gacq experiment list` shows them)."""
    count = part_count(spec)
    if count is None or not (spec.work / "parts" / cell.id).is_dir():
        return None
    return len(_parts_here(spec, cell)), count


def _parts_here(spec: ExperimentSpec, cell: Cell) -> set[int]:
    """The parts (1-based, as --parts names them) whose statistics are in the cell's work folder."""
    folder = spec.work / "parts" / cell.id
    return {int(f.stem.split("_")[1]) + 1 for f in folder.glob("stats_*.npz")} if folder.is_dir() else set()


def _check_cell_ids(spec: ExperimentSpec, ids, option: str = "--cells") -> None:
    """Refuse cell ids that the spec does not have (named by --cells, or by --parts' CELL=PARTS entries)."""
    known = {c.id for c in spec.cells}
    bad = [i for i in ids if i not in known]
    if bad:
        said = f"no cell(s) {bad} in {spec.path}" if option == "--cells" else \
            f"{option} names cell(s) {bad} that {spec.path} does not have"
        raise GacqError(f"{said}; `gacq experiment list {spec.path}` shows the ids")


def _cells_named(spec: ExperimentSpec, only: list[str] | None) -> list[Cell]:
    """The spec's cells, or those `only` names, in its order (each once; unknown ids refused)."""
    if not only:
        return spec.cells
    _check_cell_ids(spec, only)
    by_id = {c.id: c for c in spec.cells}
    return [by_id[i] for i in dict.fromkeys(only)]


def cell_times(spec: ExperimentSpec, cell: Cell) -> dict[str, float] | None:
    """A finished cell's recorded wall times in seconds (None when it is not done): `cell` (its last run, all
    phases), `quantize` (its quantization job, when it has one and recorded it) and `sample` (the sampling of its
    last run; of a cell sampled in parts, its parts' times summed), for sizing the next runs (one GPU call holds
    what fits in ten minutes)."""
    if not _done(spec, cell):
        return None
    res = json.loads((spec.cell_dir / f"{cell.id}.json").read_text())
    smeta = res.get("sample") or {}
    # a cell sampled in parts: the sum of its parts' times (the run that merged them may have sampled none)
    walls = [p.get("wall_seconds_this_run") for p in smeta.get("part_runs") or []]
    sample = sum(walls) if walls and None not in walls else smeta.get("wall_seconds_last_run")
    times = {"cell": res.get("wall_seconds_this_run"), "quantize": (res.get("quantize") or {}).get("wall_seconds"),
             "sample": sample}
    return {k: float(v) for k, v in times.items() if v is not None}


def sampled_in_last_run(spec: ExperimentSpec, cell: Cell) -> tuple[int, int] | None:
    """(images its last run drew, images in all) of a finished cell whose last run drew fewer than all, so that its
    sampling time covers only those: the rest were shards of an earlier, stopped run, or parts of other runs. None
    when it drew all of them, or is not done, or its record predates gacq keeping the count."""
    if not _done(spec, cell):
        return None
    smeta = json.loads((spec.cell_dir / f"{cell.id}.json").read_text()).get("sample") or {}
    made, n = smeta.get("images_made_this_run"), smeta.get("n")
    if smeta.get("part_runs") or made is None or n is None or made >= n:  # parts: cell_times sums every part's time
        return None
    return int(made), int(n)


def calib_seed(spec: ExperimentSpec, cell: Cell) -> int:
    """The seed of a cell's calibration trajectories."""
    return spec.calib["seed"] if cell.cseed is None else cell.cseed


def recon_seed(spec: ExperimentSpec, cell: Cell) -> int:
    """The seed of a cell's reconstruction (minibatches, rounding init order, GAC's scores)."""
    return spec.quantize["seed"] if cell.cseed is None else cell.cseed


def _calib_dir(spec: ExperimentSpec, steps: int, seed: int) -> Path:
    c = spec.calib
    g = float(spec.sample["guidance_scale"])
    name = f"calib_all_{spec.sample['scheduler']}{steps}_{spec.sample['timestep_spacing']}" \
           f"_traj{c['trajectories']}_seed{seed}" + (f"_cfg{g:g}" if g != 1.0 else "")
    return spec.work / name


def _sample_config(spec: ExperimentSpec, steps: int, seed: int):
    from .sampling import SampleConfig

    s = spec.sample
    return SampleConfig(scheduler=s["scheduler"], steps=steps, eta=float(s["eta"]), num=s["num"],
                        batch_size=s["batch_size"], seed=seed, timestep_spacing=s["timestep_spacing"],
                        guidance_scale=float(s["guidance_scale"]), compile=s.get("compile", False))


def ensure_calib(spec: ExperimentSpec, steps: int, loaded, device, seed: int | None = None) -> Path:
    """The shared all-steps calibration set of the `steps`-step sampler and calibration `seed`
    (default: the spec's), collected once."""
    from .quant.calib_data import CalibDataConfig, collect

    c = spec.calib
    seed = c["seed"] if seed is None else seed
    folder = _calib_dir(spec, steps, seed)
    if not (folder / "calib.json").exists():
        cfg = CalibDataConfig(selection="all", n_trajectories=c["trajectories"], seed=seed,
                              batch_size=c["batch_size"])
        collect(loaded, _sample_config(spec, steps, seed), cfg, device=device).save(folder)
    return folder


def _quant_config(spec: ExperimentSpec, cell: Cell, abits: int | None, job: str):
    from .quant.config import ActReconConfig, CalibDataConfig, GACConfig, QuantConfig, ReconConfig

    q = spec.quantize
    rs = recon_seed(spec, cell)
    gac = {"meta_iters": q["gac_meta_iters"], **dict(cell.gac)}
    return QuantConfig(method=cell.method, preset=q["preset"], wbits=cell.wbits, abits=abits,
                       recon=ReconConfig(iters=q["iters"], batch_size=q["recon_batch"], seed=rs),
                       act_recon=ActReconConfig(iters=q["act_iters"], batch_size=q["recon_batch"], seed=rs),
                       gac=GACConfig(seed=rs, **gac),
                       calib=CalibDataConfig(n_trajectories=spec.calib["trajectories"], seed=calib_seed(spec, cell),
                                             n_steps=min(spec.calib["record_steps"], cell.steps), draws=cell.draws),
                       recon_checkpoints=str(spec.work / "q" / f"{job}.recon-ckpt"), bias_correction=cell.bc,
                       smooth=q.get("smooth"), act_granularity=cell.gran, w8_layers=cell.w8[1] if cell.w8 else None,
                       **(dict(cell.recipe[1]) if cell.recipe else {}))


def ensure_quantized(spec: ExperimentSpec, cell: Cell, device, progress=True) -> tuple[Path | None, bool]:
    """The cell's quantized checkpoint (made, or resumed, if missing); (None, False) for FP.
    The float model is loaded only when a checkpoint has to be made."""
    from .models import load_model
    from .quant.api import quantize_to_dir

    job, float_acts, abits = quant_job_of(spec, cell)
    if job is None:
        return None, False
    qdir = spec.work / "q" / job
    cfg = _quant_config(spec, cell, abits, job)
    if (qdir / "quant_config.json").exists():
        # where the resume points lived is no setting (a checkpoint may come from another machine)
        def settings_of(config: dict) -> dict:
            return {k: v for k, v in config.items() if k != "recon_checkpoints"}

        from .quant.api import config_from_json

        stored = json.loads((qdir / "quant_config.json").read_text()).get("config") or {}
        # read through QuantConfig: a field a checkpoint of an older gacq lacks has today's default
        stored = json.loads(json.dumps(config_from_json(stored).to_json())) if stored else {}
        if settings_of(stored) != settings_of(json.loads(json.dumps(cfg.to_json()))):
            raise GacqError(f"{qdir} was quantized with other settings than this spec's; give the spec its own "
                            "`work` folder (or delete that checkpoint)")
        return qdir, float_acts
    _refuse_second_run(spec, job)
    if cell.w8:  # always from the plain job's checkpoint (made first when missing): they differ in those layers only
        from .quant.api import w8_checkpoint

        base, _ = ensure_quantized(spec, dataclasses.replace(cell, w8=None), device, progress)
        w8_checkpoint(base, qdir, load_model(spec.model, device=device), cell.w8[1], device=device,
                      extra_meta={"experiment": spec.name, "job": job})
    else:
        loaded = load_model(spec.model, device=device)
        calib = ensure_calib(spec, cell.steps, loaded, device, calib_seed(spec, cell)) \
            if cfg.needs_calibration() else None
        base = spec.work / "q" / quant_job_of(spec, dataclasses.replace(cell, bc=False))[0] if cell.bc else None
        if base is not None and (base / "quant_config.json").exists():
            from .quant.api import bias_correct_checkpoint

            bias_correct_checkpoint(base, qdir, loaded, calib, device=device, progress=progress,
                                    extra_meta={"experiment": spec.name, "job": job})
        else:
            quantize_to_dir(loaded, cfg, qdir, calib, device=device, progress=progress,
                            extra_meta={"experiment": spec.name, "job": job})
    return qdir, float_acts


def write_gac_diagnostics(spec: ExperimentSpec, qdirs: list[Path] | None = None) -> list[Path]:
    """For each finished gac checkpoint (default: every one in the spec's work folder) without one yet, its learned
    sample weights per sampling step (`gacq.diagnostics.gac_weight_profile`) as
    `<results>/diagnostics/<job>.json`, which `gacq report` plots. Returns the files written.

    A profile names the weights file it was made from (`gac_weights_sha256`). Where the job was quantized again (a
    later session requantized a checkpoint that did not come back), the old profile describes another run: it moves
    to `diagnostics/superseded/<job>-<its sha or commit>.json` (kept, as every run is) and the new one is written."""
    from .diagnostics import gac_weight_profile
    from .utils import file_sha256, write_json

    if qdirs is None:
        qdirs = sorted(d for d in (spec.work / "q").glob("*") if d.is_dir()) if (spec.work / "q").is_dir() else []
    written = []
    for qdir in qdirs:
        out = spec.results / "diagnostics" / f"{qdir.name}.json"
        gac_file = qdir / "gac_weights.safetensors"
        if not (qdir / "quant_config.json").exists() or not gac_file.exists():
            continue
        meta = json.loads((qdir / "quant_config.json").read_text())
        if meta.get("bias_corrected_from") or meta.get("w8_from"):
            continue  # a bias-corrected or 8-bit-layer copy carries its base checkpoint's GAC weights unchanged
        sha = file_sha256(gac_file)
        if out.exists():
            old = json.loads(out.read_text())
            # profiles written before the sha was recorded name only their commit
            same = old.get("gac_weights_sha256") == sha if "gac_weights_sha256" in old \
                else old.get("commit") == meta.get("commit")
            if same:
                continue
            tag = (old.get("gac_weights_sha256") or "")[:12] or str(old.get("commit") or "unknown")[:12]
            (out.parent / "superseded").mkdir(exist_ok=True)
            out.replace(out.parent / "superseded" / f"{qdir.name}-{tag}.json")
        prof = gac_weight_profile(qdir)
        prof["qdir"] = f"<work>/q/{qdir.name}"  # where it lived is no result
        prof["gac_weights_sha256"] = sha
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, prof)
        written.append(out)
    return written


def run_cell(spec: ExperimentSpec, cell: Cell, command: str, progress: bool = True) -> dict:
    """Calibrate, quantize, sample and evaluate one cell; writes and returns its result JSON."""
    from .metrics import evaluate
    from .models import load_model
    from .sampling import sample
    from .utils import atomic_path, git_commit, machine_info, resolve_device, write_json

    out = spec.cell_dir / f"{cell.id}.json"
    if _done(spec, cell):
        return json.loads(out.read_text())
    device = resolve_device(spec.device)
    t0 = time.time()

    def phase(what: str) -> None:  # one line per phase, --quiet too: a cell stopped from outside shows how far it got
        print(f"  {cell.id}: {what} at {time.time() - t0:.0f} s", flush=True)

    qdir, float_acts = ensure_quantized(spec, cell, device, progress)
    digest = checkpoint_digest(qdir) if qdir is not None else None
    if qdir is not None:
        phase(f"checkpoint {qdir.name} ready")
        try:
            write_gac_diagnostics(spec, [qdir])
        except GacqError as e:  # a diagnostic that cannot be made never stops the cell
            print(f"warning: no GAC weight profile for {qdir.name}: {e}", file=sys.stderr)
    loaded = load_model(spec.model if qdir is None else qdir, device=device, act_quant=not float_acts)
    ev = spec.eval
    part_size = part_size_of(spec)
    if part_size is not None:
        stats, smeta, grid_png = _sample_in_parts(spec, cell, loaded, device, part_size, progress, phase, digest)
    else:
        if _parts_wanted(cell.id) is not None:
            raise StoppedEarly(f"{cell.id}: not sampled (--parts: it is sampled in one run, not in parts)")
        sdir = spec.work / "samples" / cell.id
        smeta = sample(loaded, _sample_config(spec, cell.steps, cell.seed), sdir, device=device, progress=progress)
        stats, grid_png = sdir / "samples.npz", sdir / "grid.png"
    phase(f"{smeta['shape'][0]} samples drawn" + (f" ({smeta['images_made_this_run']} in this run, the rest in "
                                                 f"{smeta['shards_resumed']} shard(s) of an earlier one)"
                                                 if smeta.get("shards_resumed") else "")
          if smeta.get("parts") is None else
          f"{smeta['shape'][0]} samples' statistics merged from {smeta['parts']} parts "
          f"({smeta['images_made_this_run']} images drawn in this run)")
    metrics = evaluate(stats, ev["ref"] or None, features=ev["features"],
                       inception_weights=ev["inception_weights"] or None, device=device, progress=progress)
    phase("evaluated")
    qmeta = json.loads((qdir / "quant_config.json").read_text()) if qdir is not None else {}
    # the results folder travels with every GPU call (64 MiB in all): a JPEG (quality 90, no chroma subsampling) of
    # the sample grid is a third of the PNG's size; the samples themselves stay in the work folder
    from PIL import Image

    grid = spec.results / "grids" / f"{cell.id}.jpg"
    grid.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(grid) as tmp, Image.open(grid_png) as im:
        im.convert("RGB").save(tmp, "JPEG", quality=90, subsampling=0)
    res = {
        "schema": CELL_SCHEMA, "experiment": spec.name, "spec": str(spec.path), "spec_sha256": spec.text_sha256,
        "settings_digest": settings_digest(spec), "settings": settings(spec), "model_digest": model_digest(spec.model),
        "cell": {"id": cell.id, "method": cell.method, "bits": cell.bits, "wbits": cell.wbits,
                 "abits": cell.abits, "steps": cell.steps, "seed": cell.seed, "gac": dict(cell.gac),
                 "calib_seed": None if cell.method == "fp" else calib_seed(spec, cell),
                 "bias_correction": cell.bc, "gaussian_draws": cell.draws, "act_granularity": cell.gran,
                 "w8_layers": {cell.w8[0]: list(cell.w8[1])} if cell.w8 else None,
                 "recipe": {cell.recipe[0]: dict(cell.recipe[1])} if cell.recipe else None,
                 "recon_seed": None if cell.method == "fp" else recon_seed(spec, cell)},
        "metrics": metrics,
        "sample": {"n": smeta["shape"][0], "seed": cell.seed, "scheduler": smeta["scheduler"],
                   "steps": smeta["steps"], "eta": smeta["eta"], "timestep_spacing": smeta["timestep_spacing"],
                   "wall_seconds_last_run": smeta["wall_seconds_this_run"], "model": smeta["model"],
                   "fused_fake_quant": smeta.get("fused_fake_quant", False),
                   "matmul_tf32": smeta.get("matmul_tf32", False), "compile": smeta.get("compile", False),
                   # sampled in parts (`_sample_in_parts`): how many, and the images this run drew (the rest carried)
                   **({k: smeta[k] for k in ("parts", "part_size", "images_made_this_run", "part_runs")}
                      if "parts" in smeta else
                      # in one run: the images it drew and the shards an earlier, stopped run left (its wall time
                      # covers only the images drawn)
                      {k: smeta[k] for k in ("images_made_this_run", "shards_resumed") if k in smeta})},
        "quantize": None if qdir is None else {
            "job": qdir.name, "weights_from": qdir.name if float_acts else None, "float_acts": float_acts,
            "checkpoint_digest": digest,
            "wall_seconds": qmeta.get("wall_seconds"), "wall_seconds_runs": qmeta.get("wall_seconds_runs"),
            "peak_gpu_memory_bytes": qmeta.get("peak_gpu_memory_bytes"),
            # a resumed quantization's peak: over "all runs" where their resume points logged it, else "last run"
            **({"peak_gpu_memory_of": qmeta["peak_gpu_memory_of"]} if "peak_gpu_memory_of" in qmeta else {}),
            "commit": qmeta.get("commit"), "config": qmeta.get("config"),
            "bias_corrected_from": qmeta.get("bias_corrected_from"), "w8_from": qmeta.get("w8_from"),
            "quantize_seconds_of_base": qmeta.get("quantize_seconds_of_base"),
            "calibration_meta": qmeta.get("calibration_meta")},
        "grid": str(grid.relative_to(spec.results)),
        "commit": git_commit(), "machine": machine_info(), "command": command,
        "wall_seconds_this_run": round(time.time() - t0, 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(out, res)
    return res


DEADLINE_ENV = "GACQ_DEADLINE"  # unix time after which no new part is started (`gacq experiment run --deadline`)
PARTS_ENV = "GACQ_PARTS"  # the parts this run samples (`gacq experiment run --parts`: "8-10", "1,3", "none")
STOPPED_EXIT = 3  # the exit code of a run (and of a cell process) stopped early by --deadline or --parts


class StoppedEarly(GacqError):
    """A cell left unfinished on purpose: before a part it could not finish by the deadline, or with parts left to
    other runs (--parts); a rerun resumes it."""


class DeadlineReached(StoppedEarly):
    """A cell stopped before a part it could not finish by the deadline (`gacq experiment run --deadline`)."""


def parse_parts(text: str) -> frozenset[int]:
    """`--parts`' value: 1-based part numbers and ranges ("8-10", "1,3,5-6"), or "none" (the empty set)."""
    text = text.strip()
    if text.lower() == "none":
        return frozenset()
    got: set[int] = set()
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        lo, hi = (int(m[1]), int(m[2] or m[1])) if m else (0, -1)
        if not m or lo < 1 or hi < lo:
            raise GacqError(f"--parts {text!r}: expected 1-based part numbers and ranges such as 8-10 or 1,3,5-6, "
                            f"or none (quantize and sample nothing), or CELL=PARTS entries joined by ';'")
        got.update(range(lo, hi + 1))
    return frozenset(got)


def parse_cell_parts(text: str) -> frozenset[int] | dict[str, frozenset[int]]:
    """`--parts`' value, either one set of parts for every cell (`parse_parts`) or, per cell, entries
    "CELL=PARTS" joined by ';' ("gac_w4a8_steps100_seed2=6-10; tfmq_w4a8_steps100_seed2=1-10"): a cell not named
    then samples no part. `plan_parts` writes the second form."""
    if "=" not in text:
        return parse_parts(text)
    per: dict[str, frozenset[int]] = {}
    for entry in (e.strip() for e in text.split(";")):
        cell, eq, parts = entry.partition("=")
        if not entry:
            continue
        if not eq or not cell.strip():
            raise GacqError(f"--parts {text!r}: entry {entry!r} is not CELL=PARTS (e.g. "
                            f"gac_w4a8_steps100_seed2=6-10); join entries with ';'")
        if cell.strip() in per:
            raise GacqError(f"--parts {text!r}: cell {cell.strip()} is named twice")
        per[cell.strip()] = parse_parts(parts)
    return per


def _parts_wanted(cell_id: str) -> frozenset[int] | None:
    """The parts this process samples of the cell (PARTS_ENV, set by --parts), None for all."""
    text = os.environ.get(PARTS_ENV)
    if text is None:
        return None
    got = parse_cell_parts(text)
    return got.get(cell_id, frozenset()) if isinstance(got, dict) else got


def plan_parts(spec: ExperimentSpec, n: int, only: list[str] | None = None) -> tuple[list[str], str, list[str]]:
    """The next device call's share of the parts not yet in the work folder: the first `n` missing parts of the
    unfinished cells sampled in parts, cell by cell in spec order (or `only`'s). Returns the cells' ids, the
    `--parts` value for them (per cell: "CELL=PARTS; ...") and, per cell, a line saying what it takes and has.
    A cell's parts are all planned before the next cell's, so that cells finish (and merge) one by one."""
    count = part_count(spec)
    if count is None:
        raise GacqError(f"{spec.path}: its cells sample in one run, not in parts; there are no parts to plan")
    if n < 1:
        raise GacqError(f"parts per call must be at least 1, got {n}")
    cells = _cells_named(spec, only)
    chosen: list[str] = []
    entries: list[str] = []
    notes: list[str] = []
    for c in cells:
        if n <= 0:
            break
        if _done(spec, c):
            continue
        have = _parts_here(spec, c)
        missing = [k for k in range(1, count + 1) if k not in have][:n]
        if not missing:  # every part is here: a run with --parts none merges it
            notes.append(f"{c.id}: all {count} parts here, not merged yet (`gacq experiment run {spec.path} "
                         f"--cells {c.id} --parts none` merges them)")
            continue
        n -= len(missing)
        chosen.append(c.id)
        entries.append(f"{c.id}={_ranges(missing).replace(' ', '')}")
        notes.append(f"{c.id}: parts {_ranges(missing)} ({len(have)} of {count} here)"
                     + ("" if _checkpoint_made(spec, c) else "; its checkpoint is not in the work folder: the call "
                        "quantizes first"))
    return chosen, "; ".join(entries), notes


def part_fits(stop_at: float | None, now: float, part_seconds: float | None) -> bool:
    """Whether a part started now ends by `stop_at` (None: no deadline), judged by how long a part took
    (`part_seconds`; None: not known, and the part is started while any time is left)."""
    if stop_at is None:
        return True
    return now < stop_at and (part_seconds is None or now + part_seconds <= stop_at)


_PART_RUN = ("scheduler", "steps", "eta", "seed", "timestep_spacing", "guidance_scale", "num", "first", "compile")


def _sample_in_parts(spec: ExperimentSpec, cell: Cell, loaded, device, part_size: int, progress: bool, phase,
                     digest: str | None = None):
    """Sample a cell's images in parts of `part_size` (images first .. first + part_size - 1 of its seed's run:
    `SampleConfig.first`, so the same images as one run) and reduce each part to its feature statistics
    (`gacq.metrics.stats.part_stats`) in work/parts/<cell>/ as soon as it is drawn; parts whose statistics are there
    are not sampled again, also when they were made in another device call and carried in (scripts/gpu-dit-call.sh;
    a part's images stay where they were drawn). Returns the merged statistics (`merge_stats`), the sampling record
    of the run (part 0's, with the whole count and this run's wall time) and part 0's grid. `digest`: the quantized
    checkpoint's (`checkpoint_digest`), kept with each part; a part drawn from another run of the checkpoint (a
    folder of the same name) is refused. Parts made before gacq kept it are taken on their model's name alone."""
    import shutil

    from .metrics import make_part_stats
    from .metrics.stats import load_stats, merge_stats
    from .sampling import RUN_DEFAULTS, sample
    from .utils import write_json

    cfg = _sample_config(spec, cell.steps, cell.seed)
    n, ev = cfg.num, spec.eval
    pdir = spec.work / "parts" / cell.id
    pdir.mkdir(parents=True, exist_ok=True)
    starts = range(0, n, part_size)
    t0, made = time.time(), 0
    stop_at = float(os.environ[DEADLINE_ENV]) if os.environ.get(DEADLINE_ENV) else None
    wanted, left = _parts_wanted(cell.id), []  # --parts: the others are left to other runs
    model_id = _work_relative(spec, loaded.source)
    part_seconds = None  # how long a part takes: the last one made in this run, else the longest one recorded
    for k, first in enumerate(starts):
        path = pdir / f"stats_{k:04d}.npz"
        pcfg = dataclasses.replace(cfg, num=min(part_size, n - first), first=first)
        want = {"model": model_id, **{f: getattr(pcfg, f) for f in _PART_RUN}}
        if path.exists():  # made here or carried in: only when it is a part of this very run
            meta_file = pdir / f"meta_{k:04d}.json"
            got = {**RUN_DEFAULTS, **json.loads(meta_file.read_text())} if meta_file.exists() else {}
            if {f: got.get(f) for f in want} != want:
                diff = sorted(f for f in want if got.get(f) != want[f])
                raise GacqError(f"{path} is not part {k} of this cell's run ({', '.join(diff)} differ): another "
                                f"checkpoint, sampler or part size; delete {pdir} to sample its parts again")
            if digest is not None and got.get("checkpoint_digest") not in (None, digest):
                raise GacqError(f"{path} is not part {k} of this cell's run: it was drawn from another quantization "
                                f"run of {model_id} (checkpoint digest {got['checkpoint_digest']}, now {digest}); "
                                f"delete {pdir} to sample its parts from this checkpoint")
            continue
        if wanted is not None and k + 1 not in wanted:
            left.append(k + 1)
            continue
        if part_seconds is None:  # the cell's own parts, else any cell's in this work folder (same sampler)
            for folder, pattern in ((pdir, "meta_*.json"), (pdir.parent, "*/meta_*.json")):
                walls = [json.loads(f.read_text()).get("wall_seconds_this_run") for f in folder.glob(pattern)]
                part_seconds = max((w for w in walls if w), default=None)
                if part_seconds is not None:
                    break
        if not part_fits(stop_at, time.time(), part_seconds):
            remaining = max(stop_at - time.time(), 0)
            raise DeadlineReached(f"{cell.id}: part {k + 1} of {len(starts)} not started, {remaining:.0f} s "
                                  f"before the deadline" + (f" and a part takes about {part_seconds:.0f} s"
                                                            if part_seconds else "") + "; rerun to resume at that part")
        t_part = time.time()
        sdir = spec.work / "samples" / f"{cell.id}.part{k:04d}"
        smeta = sample(loaded, pcfg, sdir, device=device, progress=progress)
        if k == 0:  # the cell's grid and sampling record travel with the statistics
            shutil.copyfile(sdir / "grid.png", pdir / "grid.png")
        write_json(pdir / f"meta_{k:04d}.json", {**smeta, "model": model_id,
                                                  **({"checkpoint_digest": digest} if digest else {})})
        # written last (what marks the part done); the runner's evaluation defaults: pr_max 10,000, seed 0
        make_part_stats(sdir / "samples.npz", path, first, n, features=ev["features"],
                        inception_weights=ev["inception_weights"] or None, device=device, progress=progress)
        made += pcfg.num
        part_seconds = time.time() - t_part
        phase(f"part {k + 1} of {len(starts)} ({first + pcfg.num} of {n} images) sampled and reduced")
    if left:
        raise StoppedEarly(f"{cell.id}: {len(left)} of its {len(starts)} parts left to other runs (--parts): "
                           f"{_ranges(left)}; a run that finds every part's statistics in {pdir} merges them")
    parts = [load_stats(pdir / f"stats_{k:04d}.npz") for k in range(len(starts))]
    merged = merge_stats(parts, source=f"{n} samples of {cell.id} in {len(parts)} parts of {part_size}")
    metas = [json.loads((pdir / f"meta_{k:04d}.json").read_text()) for k in range(len(starts))]
    smeta = metas[0]
    part_runs = [part_run(k, m) for k, m in enumerate(metas)]
    smeta.update(shape=[n, *smeta["shape"][1:]], wall_seconds_this_run=round(time.time() - t0, 2),
                 parts=len(parts), part_size=part_size, images_made_this_run=made, part_runs=part_runs)
    return merged, smeta, pdir / "grid.png"


def part_run(k: int, meta: dict) -> dict:
    """What a cell records of the run that drew its part `k` (0-based), from the part's meta_<k>.json: parts can come
    from several device calls, commits and machines."""
    return {"part": k, **{f: meta.get(f) for f in ("commit", "device", "wall_seconds_this_run")},
            "gpu": (meta.get("machine") or {}).get("gpu")}


def _ranges(nums: list[int]) -> str:
    """1,2,3,5 -> "1-3, 5"."""
    out, start = [], None
    for i, n in enumerate(nums):
        start = n if start is None else start
        if i + 1 == len(nums) or nums[i + 1] != n + 1:
            out.append(f"{start}-{n}" if n > start else str(n))
            start = None
    return ", ".join(out)


def _checkpoint_made(spec: ExperimentSpec, cell: Cell) -> bool:
    """Whether the cell's quantization checkpoint is in the work folder (FP cells have none to make)."""
    job = quant_job_of(spec, cell)[0]
    return job is None or (spec.work / "q" / job / "quant_config.json").exists()


def _groups(spec: ExperimentSpec, cells: list[Cell]) -> list[list[Cell]]:
    """Cells that share a quantization job, in spec order (the first one's process quantizes). A w8_layers cell joins
    the group of the job it derives from, after that job's own cells (it derives once their checkpoint exists)."""
    groups: dict[str, list[Cell]] = {}
    for c in cells:
        job = quant_job_of(spec, dataclasses.replace(c, w8=None))[0]
        groups.setdefault(job or f"fp:{c.id}", []).append(c)
    return [sorted(g, key=lambda c: c.w8 is not None) for g in groups.values()]


def _launch_units(todo: list[Cell], groups: list[list[Cell]], ready) -> list[list[Cell]]:
    """What `run_experiment --parallel` hands its process slots, in the order the cells were given: a group whose
    checkpoints are all made (`ready(cell)`) has no cell waiting for another, so each of its cells is a unit of its
    own; any other group stays whole, at its first cell's place. Whole groups whose cells all started at once raced
    for the slots: `--parallel 2 --cells A1,B1,A2,B2` (A, B two methods' checkpoints) could start A1 and A2 first."""
    split = [len(g) > 1 and all(ready(x) for x in g) for g in groups]
    of = {x.id: k for k, g in enumerate(groups) for x in g}
    units, placed = [], set()
    for c in todo:
        k = of[c.id]
        if split[k]:
            units.append([c])
        elif k not in placed:
            placed.add(k)
            units.append(groups[k])
    return units


def run_experiment(spec: ExperimentSpec, only: list[str] | None = None, parallel: int = 1, command: str = "",
                   progress: bool = True, echo=print) -> list[dict]:
    """Run every unfinished cell (or the `only` ids); `parallel` > 1 runs cell groups as subprocesses."""
    import torch

    from .models import load_model
    from .utils import resolve_device

    torch.backends.cuda.matmul.allow_tf32 = spec.matmul_tf32  # this process; every --parallel child sets its own
    cells = _cells_named(spec, only)  # in the order given (`plan --cells`' order), not the spec's
    todo = [c for c in cells if not _done(spec, c)]
    count = part_count(spec)
    wanted = parse_cell_parts(os.environ[PARTS_ENV]) if os.environ.get(PARTS_ENV) is not None else None
    if isinstance(wanted, dict):
        _check_cell_ids(spec, sorted(wanted), option="--parts")
    sets = list(wanted.values()) if isinstance(wanted, dict) else [wanted or frozenset()]
    top = max((max(got) for got in sets if got), default=0)
    if count and top > count:  # a part number no cell has would leave a cell waiting for it
        raise GacqError(f"--parts {os.environ[PARTS_ENV]}: {spec.path}'s cells have {count} parts of "
                        f"{part_size_of(spec)} samples (1-{count}); part {top} does not exist")
    if todo:  # a cell's metrics come last: a feature network or reference they cannot use is refused before
        from .metrics.evaluate import check_eval_setup  # any cell spends time calibrating and sampling

        ev = spec.eval
        try:
            check_eval_setup(ev["features"], ev["ref"] or None, ev["inception_weights"] or None)
        except GacqError as e:
            raise GacqError(f"{spec.path} [eval]: {e}") from None
    echo(f"{spec.name}: {len(cells) - len(todo)} of {len(cells)} cells done, running {len(todo)}")
    if parallel <= 1 or len(todo) <= 1:
        # one process, the cells in turn (a compiled model call is compiled once for all of them): a cell that leaves
        # parts to other runs (--parts) does not stop the next; one the deadline stopped stops the run
        out, stopped = [], []
        for i, c in enumerate(todo):
            echo(f"[{i + 1}/{len(todo)}] {c.id}")
            try:
                res = run_cell(spec, c, command, progress)
            except StoppedEarly as e:
                stopped.append(e)
                if isinstance(e, DeadlineReached) or i + 1 == len(todo):
                    break
                echo(f"  stopped: {e}")
                continue
            m = res["metrics"]
            echo(f"  FID {m['fid']:.3f}  sFID {m['sfid']:.4f}  IS {m['is_mean']:.3f}  P {m['precision']:.3f}  "
                 f"R {m['recall']:.3f}  ({m['feature_network']['name']} features, {m['samples']['n']} samples)")
            out.append(res)
        if len(stopped) == 1:
            raise stopped[0]
        if stopped:
            raise StoppedEarly(f"{len(stopped)} cell(s) stopped early, the last: {stopped[-1]}")
        return out
    # the processes share calibration sets: make them first, once (only cells whose checkpoint is missing need one)
    device = resolve_device(spec.device)
    need = sorted({(c.steps, calib_seed(spec, c)) for c in todo if c.method != "fp" and not _checkpoint_made(spec, c)})
    if need:
        fp = load_model(spec.model, device=device)
        for st, cs in need:
            ensure_calib(spec, st, fp, device, cs)
    logs = spec.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    # several GPUs: each process slot owns one (whole cells per GPU), slots spread round-robin
    import queue

    n_gpus = torch.cuda.device_count() if device.type == "cuda" and device.index is None else 0
    slots: queue.Queue = queue.Queue()
    for j in range(parallel):
        slots.put(j % n_gpus if n_gpus > 1 else None)

    # on a GPU, torch's CPU threads: each process defaults to one per core, so N processes would oversubscribe the
    # cores N times over; they share them instead (an OMP_NUM_THREADS the user set is kept). Not on the CPU, where
    # the thread count changes the rounding of the cells' arithmetic (results would depend on --parallel).
    threads = max(1, (os.cpu_count() or 1) // parallel) if device.type == "cuda" else None

    def launch(group: list[Cell]) -> tuple[list[Cell], int, Path]:
        log = logs / f"{group[0].id}.log"
        args = [sys.executable, "-m", "gacq", "experiment", "run", str(spec.path), "--results", str(spec.results),
                "--cells", ",".join(c.id for c in group)] + ([] if progress else ["--quiet"])
        gpu = slots.get()
        env = dict(os.environ) if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
        if threads is not None:
            env.setdefault("OMP_NUM_THREADS", str(threads))
        try:
            with open(log, "a") as f:
                rc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, cwd=os.getcwd(), env=env).returncode
        finally:
            slots.put(gpu)
        return group, rc, log

    def side_by_side(cells: list[Cell]) -> list[tuple[list[Cell], int, Path]]:  # a process each, at once
        with ThreadPoolExecutor(len(cells)) as sub:
            return list(sub.map(lambda c: launch([c]), cells))

    def run_group(group: list[Cell]) -> list[tuple[list[Cell], int, Path]]:
        # a group whose checkpoints were all there (an earlier run or device call made them) came as one unit per
        # cell (`_launch_units`): no cell waits for another (a cell that samples only some of its parts, --parts,
        # would otherwise hold the others back a whole run). Here the first cell quantizes (or finds the checkpoint);
        # the others only sample it, so they then run as processes of their own, side by side, instead of one after
        # another behind the quantization
        first = launch(group[:1])
        went_on = first[1] == 0 or (first[1] == STOPPED_EXIT and os.environ.get(PARTS_ENV) is not None
                                    and all(_checkpoint_made(spec, c) for c in group))
        # stopped with parts left to other runs (--parts) after the checkpoint was made: the rest sample theirs (a
        # deadline that stopped it stops them too, judged by its parts' times)
        if not went_on or len(group) == 1:  # the rest wait for the next run: stopped with it, or not run
            rest = STOPPED_EXIT if first[1] == STOPPED_EXIT else None
            return [first] + ([(group[1:], rest, first[2])] if len(group) > 1 else [])
        return [first] + side_by_side(group[1:])

    groups = _groups(spec, todo)
    echo(f"{len(groups)} quantization group(s) of {len(todo)} cell(s), {parallel} process(es) at a time"
         + (f" over {n_gpus} GPUs" if n_gpus > 1 else "") + f"; logs in {logs}")
    failed, stopped = [], []
    with ThreadPoolExecutor(parallel) as pool:
        for runs in pool.map(run_group, _launch_units(todo, groups, lambda c: _checkpoint_made(spec, c))):
            for group, rc, log in runs:
                state = ("done" if rc == 0 else "not run: the group's first cell failed" if rc is None
                         else "stopped early by --deadline or --parts (rerun to resume)" if rc == STOPPED_EXIT
                         else f"FAILED (exit {rc}, see {log})")
                echo(f"  {', '.join(c.id for c in group)}: {state}")
                if rc == STOPPED_EXIT:
                    stopped.append(group[0].id)
                elif rc != 0:
                    failed.append(log)
    if stopped and not failed:
        raise StoppedEarly(f"{len(stopped)} cell(s) stopped early (--deadline, --parts; their logs say which): "
                           f"{', '.join(stopped)}; rerun to resume them")
    if failed:
        failed = list(dict.fromkeys(failed))
        raise GacqError(f"{len(failed)} cell process(es) failed; logs: {', '.join(map(str, failed))}. "
                        "Rerun the same command to resume them.")
    return [json.loads((spec.cell_dir / f"{c.id}.json").read_text()) for c in todo]
