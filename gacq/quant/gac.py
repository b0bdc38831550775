"""Gradient-Aligned Calibration (GAC): learned per-sample weights by bilevel optimisation.

The specification is `shared/docs/method.md` (the paper's Algorithms 1 and 2). For every block:
scores s (one per calibration sample, initialised to 1/32) give weights w = softmax(s / tau);
each meta-iteration takes a differentiable weighted step of the block's quantization parameters
(AdaRound rounding variables V) on a minibatch B,

    theta' = theta - eta * mean_{i in B} (N w_i grad_theta l_i(theta)),

(the spec's sum_i w_i grad l_i written for a minibatch: equal to it when B is the whole set), then
scores the step on a timestep-balanced validation split cut into K timestep groups:

    L = -mean_{k<l} G_k . G_l + mean_k l_k(theta'),    G_k = d l_k(theta') / d w_B,

the paper's surrogate gradient-matching loss (group gradients taken with respect to the
sample weights, so only second-order terms appear), and moves s with Adam. The block is then
reconstructed as TFMQ-DM does, with the learned weights in its loss; validation samples get
weight 0 there (they never enter the weighted reconstruction).

Choices the paper leaves open, all configurable (`GACConfig`), are named here: the inner step
uses the same per-sample loss as the reconstruction (the baselines' lp loss, p = 2); the
validation split is taken once per calibration set, never per block; groups are contiguous
ranges of sampling steps with (as nearly as possible) equal numbers of steps; TFMQ-DM's
temporal-block reconstruction is left unweighted; with zero meta-iterations no split is taken
and the result is exactly TFMQ-DM's.

On a GPU a meta-iteration of a small block is launch-bound (an inner forward and backward with
graph, K forwards and double backwards, and the backward through all of it: thousands of small
kernels). As the block reconstruction does, the meta-gradient is then captured once per block as
a CUDA graph and replayed with each minibatch's and validation subset's indices copied into its
static inputs (`ReconConfig.cuda_graph`, on by default); the optimiser step on the scores stays
outside. The meta-losses stay on the device and are checked for NaN/inf after the block's last
meta-iteration. If capture fails, the block warns once and runs eagerly.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import GacqError
from .config import GACConfig  # noqa: F401 (defined there, torch-free)
from .recon import UnitData, lp_loss_per_sample, trainable_layers


def validation_split(step: torch.Tensor, fraction: float, groups: int, seed: int = 0
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Timestep-balanced validation split.

    From every sampling step, round(fraction * count) samples (at least 1) are held out, chosen
    at random; the held-out samples are grouped into `groups` contiguous ranges of steps.
    Returns (train indices, [validation indices of group k]).
    """
    steps = torch.unique(step)
    if len(steps) < groups:
        raise GacqError(f"GAC needs calibration samples from at least K={groups} sampling steps, got {len(steps)}: "
                        f"lower K (`gacq quantize --gac-groups {len(steps)}`, or `gac = {{groups = [{len(steps)}]}}` "
                        "in an experiment grid) or calibrate on a sampler with more steps")
    g = torch.Generator().manual_seed(seed)
    val_mask = torch.zeros(len(step), dtype=torch.bool)
    for k in steps:
        idx = torch.nonzero(step == k).flatten()
        n_val = max(1, round(fraction * len(idx)))
        if n_val >= len(idx):
            raise GacqError(f"sampling step {int(k)} has only {len(idx)} calibration sample(s): too few to hold "
                            f"out a validation share; collect more trajectories")
        val_mask[idx[torch.randperm(len(idx), generator=g)[:n_val]]] = True
    group_idx = [torch.nonzero(val_mask & in_group).flatten() for in_group in step_groups(step, groups)]
    return torch.nonzero(~val_mask).flatten(), group_idx


def step_groups(step: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """GAC's timestep groups: `groups` contiguous ranges of the distinct sampling steps in `step`
    (as nearly equal in count as possible); one boolean mask over `step` per group."""
    steps = torch.unique(step)
    bounds = torch.linspace(0, len(steps), groups + 1).round().long()
    return [torch.isin(step, steps[bounds[k]:bounds[k + 1]]) for k in range(groups)]


class GACBlock:
    """Algorithm 2 on one block whose inputs/targets are cached in `data`."""

    def __init__(self, unit: nn.Module, data: UnitData, train_idx: torch.Tensor, groups: list[torch.Tensor],
                 cfg: GACConfig, cuda_graph: bool = False):
        from .recon import use_cuda_graph

        self.unit, self.data, self.cfg = unit, data, cfg
        # "capture": a CUDA graph; "static": the same static-input bookkeeping run eagerly (tests on CPUs)
        self.static_mode = "capture" if use_cuda_graph(data.device, cuda_graph) else None
        dev = data.device
        self.train_idx = train_idx.to(dev)
        self.groups = [gidx.to(dev) for gidx in groups]
        self.layers = trainable_layers(unit)
        if not self.layers:
            raise GacqError("GAC: the block has no quantized layers to calibrate")
        for m in self.layers:
            m.w_quant = True
            m.enable_adaround()  # soft rounding at the grid init: theta_Q of the block
        mine = {id(m.adaround.alpha) for m in self.layers}  # not the frozen (hard-rounded) TIB layers
        self.theta = {n: p for n, p in unit.named_parameters() if id(p) in mine}
        self.scores = torch.full((len(train_idx),), cfg.init_score, device=dev, dtype=torch.float64,
                                 requires_grad=True)

    def close(self) -> None:
        for m in self.layers:
            m.adaround = None

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.scores / self.cfg.tau, dim=0)

    def _loss(self, theta: dict, idx: torch.Tensor) -> torch.Tensor:
        a, k = self.data.inputs(idx)
        # the fused attention kernels have no double backward; the math one is plain differentiable ops
        with sdpa_kernel([SDPBackend.MATH]):
            out = functional_call(self.unit, theta, tuple(a), k)
        out = out if torch.is_tensor(out) else out[0]
        return lp_loss_per_sample(out, self.data.target[idx], self.cfg.p)

    def _inner_step(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """w_B and theta' = theta - eta * mean_{i in B} N w_i grad l_i (differentiable in w_B)."""
        w_b = self.weights()[batch]
        n = len(self.train_idx)
        per = self._loss(self.theta, self.train_idx[batch])
        inner = (n * w_b.to(per.dtype) * per).mean()
        names = list(self.theta)
        grads = torch.autograd.grad(inner, [self.theta[k] for k in names], create_graph=True)
        return w_b, {k: self.theta[k] - self.cfg.inner_lr * g for k, g in zip(names, grads)}

    def _group(self, theta2: dict, w_b: torch.Tensor, vidx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """l_k(theta') and G_k = d l_k / d w_B of one validation group (graphs kept)."""
        ell = self._loss(theta2, vidx).mean()
        (g_w,) = torch.autograd.grad(ell, w_b, create_graph=True)
        return ell, g_w

    @staticmethod
    def _gm(gs) -> torch.Tensor:
        k = len(gs)
        return sum((gs[a] * gs[b]).sum() for a in range(k) for b in range(a + 1, k)) * (2.0 / (k * (k - 1)))

    def _meta_terms(self, batch: torch.Tensor, val: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L, gradient matching term, validation loss) as tensors (no host sync: capturable)."""
        w_b, theta2 = self._inner_step(batch)
        ells, gs = zip(*(self._group(theta2, w_b, vidx) for vidx in val))
        gm = self._gm(gs)
        mse = torch.stack(ells).mean()
        return -gm + mse, gm, mse

    def meta_loss(self, batch: torch.Tensor, val: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """L(s) for a minibatch (positions into the train indices) and validation subsets."""
        loss, gm, mse = self._meta_terms(batch, val)
        return loss, {"gm": float(gm.detach()), "val_mse": float(mse.detach())}

    def _static_meta_grad(self, b: int, sizes: list[int]):
        """The single-process meta-gradient on static index buffers: returns replay(batch, val) ->
        (dL/ds, L, gm, val_mse), device tensors that the next replay overwrites. In "capture" mode
        one call is captured as a CUDA graph and replayed; in "static" mode it is called each time."""
        dev = self.scores.device
        sb = torch.arange(b, device=dev)
        sv = [gidx[:n].clone() for gidx, n in zip(self.groups, sizes)]

        def fn():
            loss, gm, mse = self._meta_terms(sb, sv)
            (grad,) = torch.autograd.grad(loss, [self.scores])
            return grad.detach(), loss.detach(), gm.detach(), mse.detach()

        graph, outs = None, None
        if self.static_mode == "capture":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up (cuBLAS handles, autograd's streams), as capture needs
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = fn()

        def replay(batch: torch.Tensor, val: list[torch.Tensor]):
            nonlocal outs
            sb.copy_(batch)
            for buf, v in zip(sv, val):
                buf.copy_(v)
            if graph is not None:
                graph.replay()
            else:
                outs = fn()
            return outs

        return replay

    def meta_grad(self, batch: torch.Tensor, val: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """dL/ds (and L) for one meta-iteration.

        In a data-parallel group (`torchrun`, `--gpus N`) the K validation groups, the costly part
        (each is a forward and a double backward at theta'), are split round-robin over the ranks;
        every rank takes the cheap minibatch step theta' itself. L depends on the groups only
        through the G_k and l_k, so with c_k = dL/dG_k = -2/(K(K-1)) sum_{l != k} G_l from the
        gathered (detached) G's, the rank's share sum_{k mine} (c_k . G_k + l_k / K) has exactly
        the groups' part of dL/ds as its gradient; the shares are all-reduced. One set of scores,
        equal on every rank; equal to one process up to the order of floating-point sums.
        """
        from .. import distributed as gdist

        world = gdist.world_size()
        if world == 1:
            loss, info = self.meta_loss(batch, val)
            (grad,) = torch.autograd.grad(loss, [self.scores])  # theta is only differentiated through
            return grad, loss.detach(), info
        k = len(val)
        w_b, theta2 = self._inner_step(batch)
        mine = list(gdist.owned(k, gdist.rank(), world))
        G = torch.zeros(k, len(batch), dtype=w_b.dtype, device=w_b.device)
        ell_all = torch.zeros(k, dtype=torch.float64, device=w_b.device)
        own = {}
        for j in mine:
            ell, g_w = self._group(theta2, w_b, val[j])
            own[j] = (ell, g_w)
            G[j], ell_all[j] = g_w.detach(), ell.detach().double()
        gdist.all_reduce_sum([G, ell_all], "gathering GAC's validation-group gradients")
        share = w_b.sum() * 0.0  # keeps the graph for a rank without groups (more ranks than K)
        for j, (ell, g_w) in own.items():
            c = -(2.0 / (k * (k - 1))) * (G.sum(0) - G[j])
            share = share + (c * g_w).sum() + ell / k
        (grad,) = torch.autograd.grad(share, [self.scores])
        grad = grad.contiguous()
        gdist.all_reduce_sum([grad], "reducing GAC's meta-gradients")
        gm = self._gm(list(G))
        loss = -gm + ell_all.mean().to(gm.dtype)
        return grad, loss, {"gm": float(gm), "val_mse": float(ell_all.mean())}

    def _val_subsets(self, gen: torch.Generator) -> list[torch.Tensor]:
        out = []
        for gidx in self.groups:
            if self.cfg.val_batch is not None and len(gidx) > self.cfg.val_batch:
                gidx = gidx[torch.randperm(len(gidx), generator=gen)[: self.cfg.val_batch].to(gidx.device)]
            out.append(gidx)
        return out

    def _batches(self, gen: torch.Generator):
        """Minibatches through successive permutations of the training samples (epochs)."""
        n, b = len(self.train_idx), min(self.cfg.batch_size, len(self.train_idx))
        order, pos = torch.randperm(n, generator=gen), 0
        while True:
            if pos + b > n:
                order, pos = torch.cat([order[pos:], torch.randperm(n, generator=gen)]), 0
            yield order[pos:pos + b].to(self.scores.device)
            pos += b

    def run(self) -> tuple[torch.Tensor, list[dict]]:
        cfg = self.cfg
        if cfg.meta_optimizer == "adam":
            opt = torch.optim.SparseAdam([self.scores], lr=cfg.meta_lr)
        elif cfg.meta_optimizer == "sgd":
            opt = torch.optim.SGD([self.scores], lr=cfg.meta_lr)
        else:
            opt = torch.optim.Adam([self.scores], lr=cfg.meta_lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        batches = self._batches(gen)
        replay = None
        if self.static_mode is not None and cfg.meta_iters > 0:
            sizes = [len(v) for v in self._val_subsets(torch.Generator().manual_seed(0))]  # fixed per block
            try:
                replay = self._static_meta_grad(min(cfg.batch_size, len(self.train_idx)), sizes)
            except Exception as e:  # noqa: BLE001 - any capture failure: the eager path gives the same result
                warnings.warn(f"GAC: CUDA graph capture of the meta-gradient failed ({type(e).__name__}: {e}); "
                              "running this block eagerly", stacklevel=2)
        log, hist = [], []
        for it in range(cfg.meta_iters):
            batch = next(batches)
            val = self._val_subsets(gen)
            if replay is not None:
                grad, loss, gm, mse = replay(batch, val)
                hist.append(torch.stack([loss, gm, mse]).double())  # checked after the last iteration
            else:
                grad, loss, info = self.meta_grad(batch, val)
                if not torch.isfinite(loss):
                    raise GacqError(f"GAC meta-objective is {loss.item()} at meta-iteration {it}; "
                                    "lower --gac-inner-lr")
                log.append({"it": it, "loss": float(loss.detach()), **info})
            # only the minibatch's scores (and their moments) move; its indices are a permutation's slice, valid by
            # construction (checking them would sync with the GPU every meta-iteration)
            if cfg.meta_optimizer == "adam":
                with warnings.catch_warnings():  # torch 2.11 warns once per process that the checks are off
                    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
                    grad = torch.sparse_coo_tensor(batch[None], grad[batch], grad.shape, check_invariants=False)
            self.scores.grad = grad
            opt.step()
        if hist:
            h = torch.stack(hist).cpu()
            bad = torch.nonzero(~torch.isfinite(h[:, 0])).flatten()
            if len(bad):
                it = int(bad[0])
                raise GacqError(f"GAC meta-objective is {h[it, 0].item()} at meta-iteration {it}; "
                                "lower --gac-inner-lr")
            log = [{"it": it, "loss": float(r[0]), "gm": float(r[1]), "val_mse": float(r[2])}
                   for it, r in enumerate(h)]
        return self.weights().detach(), log


def make_gac_weight_fn(step: torch.Tensor, cfg: GACConfig, device: torch.device | str = "cpu",
                       store: dict | None = None, cuda_graph: bool = True):
    """A `weight_fn` for `reconstruct_model`: runs Algorithm 2 on each block and returns weights
    over all cached samples (validation samples 0). `store[name]` receives the learned weights
    (over all samples) and the meta log of every block. `cuda_graph`: replay each block's
    meta-gradient as a CUDA graph on GPUs (one process)."""
    if cfg.meta_iters == 0:
        return None
    train_idx, groups = validation_split(step, cfg.val_fraction, cfg.groups, cfg.seed)

    def weight_fn(name, unit, args, kwargs, target):
        data = UnitData(unit, args, kwargs, target, cfg.p, None, device)
        if data.n != len(step):
            raise GacqError(f"GAC: block {name} has {data.n} cached samples but the calibration set has {len(step)}")
        block = GACBlock(unit, data, train_idx, groups, cfg, cuda_graph)
        try:
            w_train, log = block.run()
        finally:
            block.close()
        full = torch.zeros(data.n, dtype=torch.float64)
        full[train_idx] = w_train.cpu()
        if store is not None:
            store[name] = {"weights": full.float(), "log": log}
        return full.float()

    return weight_fn
