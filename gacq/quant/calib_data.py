"""Calibration data: (x_t, t) pairs taken along full-precision sampling trajectories.

Selections (baselines.md §4):
- `uniform` (Q-Diffusion): every `steps // n_steps`-th sampling step (step indices 0, k, 2k, ...),
  the same trajectories recorded at each chosen step; `n_per_step` trajectories.
- `gaussian` (PTQ4DM's NDTC): each trajectory is recorded at one step whose diffusion timestep is
  drawn as t = int(N(mu, sigma) * T), clamped to [0, T-1], and mapped to the sampling step whose
  timestep is nearest. Unlike the released PTQ4DM code, the recorded t is the timestep at which x
  was actually produced (that code fed a loop counter as t). With `draws` = d > 1 each trajectory
  is recorded at d such draws (with replacement: a step drawn twice is recorded twice, so the
  timesteps keep the Gaussian's distribution), which gives PTQ4DM's selection as many samples as
  the uniform one (d = n_steps) from the same trajectories: gacq's option for comparisons at equal
  data, not part of PTQ4DM.
- `all`: every sampling step (TFMQ-DM's activation set uses all of them).

Trajectories use the per-sample generators of `gacq.sampling` (seed, index), so a set is
reproducible from its metadata. Sets are saved as safetensors shards plus `calib.json`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import GacqError
from ..models import LoadedModel
from ..sampling import SampleConfig, generate, make_scheduler
from ..utils import atomic_path, write_json
from .config import CalibDataConfig  # noqa: F401 (defined there, torch-free)


@dataclass
class CalibrationSet:
    """x: model inputs (N, C, H, W); t: their timesteps (N,); step: sampling-step index (N,);
    cond: batch-aligned conditioning (`gacq.conditioning`), e.g. class_labels (N,), empty when none."""

    x: torch.Tensor
    t: torch.Tensor
    step: torch.Tensor
    meta: dict
    cond: dict = field(default_factory=dict)

    def subset(self, idx: torch.Tensor, meta: dict | None = None) -> "CalibrationSet":
        return CalibrationSet(self.x[idx], self.t[idx], self.step[idx], self.meta if meta is None else meta,
                              {k: v[idx] for k, v in self.cond.items()})

    def __len__(self) -> int:
        return len(self.t)

    def digest(self) -> str:
        """sha256 of the samples (x, t, step, cond): which set a resumed reconstruction must find again."""
        from .recon import tensors_sha256

        return tensors_sha256({"x": self.x, "t": self.t, "step": self.step,
                               **{f"cond.{k}": v for k, v in self.cond.items()}})

    def save(self, folder: str | Path, shard_size: int = 4096) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        n_shards = max(1, -(-len(self) // shard_size))
        for k in range(n_shards):
            sl = slice(k * shard_size, (k + 1) * shard_size)
            with atomic_path(folder / f"calib_{k:05d}.safetensors") as tmp:
                save_file({"x": self.x[sl].contiguous(), "t": self.t[sl].contiguous(),
                           "step": self.step[sl].contiguous(),
                           **{f"cond.{k}": v[sl].contiguous() for k, v in self.cond.items()}}, str(tmp))
        write_json(folder / "calib.json", {**self.meta, "count": len(self), "shards": n_shards})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "CalibrationSet":
        folder = Path(folder)
        meta_file = folder / "calib.json"
        if not meta_file.exists():
            raise GacqError(f"{folder} is not a calibration set (no calib.json)")
        meta = json.loads(meta_file.read_text())
        parts = []
        for k in range(meta["shards"]):
            path = folder / f"calib_{k:05d}.safetensors"
            if not path.exists():
                raise GacqError(f"calibration set {folder} is incomplete: {path.name} is missing")
            parts.append(load_file(str(path)))
        xs, ts, steps = (torch.cat([p[key] for p in parts]) for key in ("x", "t", "step"))
        cond = {k[5:]: torch.cat([p[k] for p in parts]) for k in parts[0] if k.startswith("cond.")}
        if len(ts) != meta["count"] or len(xs) != len(ts) or len(steps) != len(ts):
            raise GacqError(f"calibration set {folder} is corrupt: {len(ts)} samples, calib.json says {meta['count']}")
        meta = {k: v for k, v in meta.items() if k not in ("count", "shards")}
        return cls(xs, ts, steps, meta, cond)


def select_from_all(cs: CalibrationSet, cfg: CalibDataConfig, num_train_timesteps: int = 1000) -> CalibrationSet:
    """The set `collect(..., cfg)` would record, cut out of an all-steps set of the same sampler,
    seed and trajectory count (the same trajectories, so the same x): one collection can serve
    every method's timestep selection."""
    sel = cs.meta.get("selection", {})
    if sel.get("selection") != "all":
        raise GacqError("only an all-steps calibration set (`gacq calib --selection all`) can be cut into another selection")
    if cfg.selection == "all":
        return cs
    n_traj = int(sel["n_trajectories"])
    if cfg.n_trajectories > n_traj or cfg.seed != sel.get("seed", 0):
        raise GacqError(f"the all-steps set has {n_traj} trajectories with seed {sel.get('seed')}; it cannot stand in "
                        f"for {cfg.n_trajectories} trajectories with seed {cfg.seed}")
    n_steps = int(cs.step.max()) + 1
    nb = len(cs) // max(1, n_traj * n_steps)  # guidance branches per trajectory and step (1 or 2)
    if nb < 1 or len(cs) != n_traj * n_steps * nb:
        raise GacqError(f"the all-steps set holds {len(cs)} samples, not {n_traj} trajectories x {n_steps} steps")
    timesteps = cs.t.view(n_steps, n_traj * nb)[:, 0]
    wanted = select_steps(cfg, timesteps, num_train_timesteps)
    # collect orders by step, trajectory, branch; the all-steps set is stored the same way
    rows = sorted(((k * n_traj + i) * nb + b, k) for i in range(cfg.n_trajectories) for k in wanted[i]
                  for b in range(nb))
    idx = torch.tensor([r for r, _ in rows], dtype=torch.long)
    meta = {**cs.meta, "selection": asdict(cfg), "cut_from_all_steps": True}
    return cs.subset(idx, meta)


def select_steps(cfg: CalibDataConfig, timesteps: torch.Tensor, num_train_timesteps: int) -> list[list[int]]:
    """For each trajectory, the sampling-step indices at which it is recorded."""
    n_sampling = len(timesteps)
    if cfg.selection == "all":
        return [list(range(n_sampling))] * cfg.n_trajectories
    if cfg.selection == "uniform":
        if cfg.n_steps > n_sampling:
            raise GacqError(f"cannot record {cfg.n_steps} steps of a {n_sampling}-step sampler")
        stride = n_sampling // cfg.n_steps
        return [list(range(0, stride * cfg.n_steps, stride))] * cfg.n_trajectories
    g = torch.Generator().manual_seed(cfg.seed)
    # draws=1 keeps the draw of earlier versions (one value per trajectory, in trajectory order)
    draws = torch.randn(cfg.n_trajectories, cfg.draws, generator=g, dtype=torch.float64) * cfg.sigma + cfg.mu
    t_star = (draws * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    nearest = (timesteps.double()[None, None, :] - t_star.double()[:, :, None]).abs().argmin(dim=2)
    return [sorted(int(k) for k in row) for row in nearest]


@torch.no_grad()
def collect(loaded: LoadedModel, sample_cfg: SampleConfig, cfg: CalibDataConfig,
            device: torch.device | str = "cpu", progress: bool = True) -> CalibrationSet:
    """Run the FP sampler and record the model inputs chosen by `cfg` (ordered by step, sample, branch).

    Class-conditional models: the labels are recorded with the inputs; with classifier-free
    guidance (`sample_cfg.guidance_scale` != 1) the model sees a conditional and an unconditional
    branch, whose activations differ, and both are recorded (the null label in the second).
    Under a process group (`gacq.distributed`) every rank calls this: batch j of trajectories
    runs on rank j mod world, and every rank returns the whole set, equal to one process's.
    """
    from .. import distributed as gdist
    from ..conditioning import predict_eps

    device = torch.device(device)
    sched = make_scheduler(sample_cfg, loaded.scheduler_config)
    timesteps = sched.timesteps.clone()
    wanted = select_steps(cfg, timesteps, sched.config.num_train_timesteps)
    last_needed = max(max(w) for w in wanted)
    counts = [Counter(w) for w in wanted]
    records: dict[int, list[tuple[int, int, torch.Tensor, dict]]] = {}
    # drawn eagerly: the recording model_fn is no compiled model call (`SampleConfig.compile` is for sampling)
    sample_cfg = replace(sample_cfg, compile=False)
    scfg = replace(sample_cfg, seed=cfg.seed)
    rank, world = gdist.rank(), gdist.world_size()
    starts = range(0, cfg.n_trajectories, cfg.batch_size)
    mine = [starts[j] for j in gdist.owned(len(starts), rank, world)]  # whole batches: the same model calls
    bar = tqdm(total=sum(min(cfg.batch_size, cfg.n_trajectories - lo) for lo in mine), unit="traj",
               desc="calibration data" + (f" (rank 0 of {world})" if world > 1 else ""),
               disable=not progress or rank != 0)
    for lo in mine:
        idx = list(range(lo, min(cfg.n_trajectories, lo + cfg.batch_size)))
        step = {"k": 0}

        def recording_model(x, t, cond, idx=idx, step=step):
            k = step["k"]
            for row in range(len(x)):  # rows: the batch, repeated once per guidance branch
                i, branch = idx[row % len(idx)], row // len(idx)
                for _ in range(counts[i].get(k, 0)):  # a step drawn twice ('gaussian', draws > 1) is kept twice
                    c = {key: v[row].detach().cpu().clone() for key, v in (cond or {}).items()}
                    records.setdefault(k, []).append((i, branch, x[row].detach().float().cpu().clone(), c))
            step["k"] += 1
            if k >= last_needed:  # nothing later is recorded: finish cheaply with a zero prediction
                return torch.zeros_like(x)
            return predict_eps(loaded.model, x, t, cond)

        generate(loaded, scfg, idx, device, model_fn=recording_model)
        bar.update(len(idx))
    bar.close()
    if world > 1:
        merged: dict[int, list[tuple[int, int, torch.Tensor, dict]]] = {}
        for part in gdist.all_gather_object(records, "gathering the calibration data"):
            for k, rows in part.items():
                merged.setdefault(k, []).extend(rows)
        records = merged
    xs, ts, steps, conds = [], [], [], []
    for k in sorted(records):
        for _, _, x, c in sorted(records[k], key=lambda r: (r[0], r[1])):
            xs.append(x)
            ts.append(int(timesteps[k]))
            steps.append(k)
            conds.append(c)
    cond = {key: torch.stack([c[key] for c in conds]) for key in conds[0]} if conds and conds[0] else {}
    meta = {"model": loaded.source, "sampler": asdict(sample_cfg), "selection": asdict(cfg)}
    return CalibrationSet(torch.stack(xs), torch.tensor(ts, dtype=torch.long), torch.tensor(steps, dtype=torch.long),
                          meta, cond)


def timestep_histogram(cs: CalibrationSet) -> dict[int, int]:
    values, counts = np.unique(cs.t.numpy(), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}
