"""TFMQ-DM's temporal information block (TIB) and its reconstruction (TIAR), baselines.md §5.

The TIB is the part of a UNet that depends on t only (for DiT, see `TIB`): the time embedding MLP
(`TimestepEmbedding`: linear_1 -> act -> linear_2) and every ResnetBlock2D's
`time_emb_proj(act(emb))`. Its outputs are the temporal features, one per resnet block.
TIAR rounds all of its quantized linears jointly with AdaRound so that every temporal
feature matches the FP model's on the same t (sum of the per-feature Lp losses plus the
rounding regulariser). The TIB's layers are then marked `recon_frozen`, so the block
reconstruction that follows leaves them alone (TFMQ-DM's `quant_emb` flag).

Modules are found by type (Timesteps, TimestepEmbedding, ResnetBlock2D, AdaLayerNormZero), not attribute paths.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import GacqError
from .modules import QuantLayer
from .recon import ReconConfig, adaround_optimise, batch_plan, lp_loss_per_sample


class TIB:
    """Handles on a model's temporal information block.

    UNet2DModel: the time-embedding MLP and every resnet's `time_emb_proj`; the temporal features
    are the projections' outputs. DiTTransformer2DModel (adaLN-Zero): time and label enter every
    transformer block through the block's own timestep-label embedder (`norm1.emb`: sinusoid ->
    linear_1 -> SiLU -> linear_2, plus the label embedding) and its modulation linear
    (`norm1.linear`, the 6 shift/scale/gate vectors), and the output layer through `proj_out_1`
    (fed by block 0's embedder). Those depend on (t, label) only: they are the DiT's TIB, and the
    modulation vectors (and proj_out_1's shift/scale) are its temporal features. This is gacq's
    choice for the tfmq baseline on DiT (TFMQ-DM itself only treats UNets).
    """

    def __init__(self, model: nn.Module):
        kind = type(model).__name__
        if kind == "UNet2DModel":
            self._unet(model)
        elif kind == "DiTTransformer2DModel":
            self._dit(model)
        else:
            raise GacqError(f"TFMQ-DM's temporal block is implemented for UNet2DModel and DiTTransformer2DModel, "
                            f"not {kind}")

    def _unet(self, model: nn.Module) -> None:
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.resnet import ResnetBlock2D

        self.kind = "unet"
        projs = [m for m in model.modules() if isinstance(m, Timesteps)]
        embs = [m for m in model.modules() if isinstance(m, TimestepEmbedding)]
        if len(projs) != 1 or len(embs) != 1:
            raise GacqError(
                f"TFMQ-DM's temporal block needs one sinusoidal Timesteps module and one TimestepEmbedding; "
                f"this model has {len(projs)} and {len(embs)}")
        self.time_proj, self.time_embedding = projs[0], embs[0]
        self.resnets = [(n, m) for n, m in model.named_modules()
                        if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None]
        if not self.resnets:
            raise GacqError("the model has no resnet blocks with a time-embedding projection")
        self.dtype = next(self.time_embedding.parameters()).dtype
        # class-conditional UNets add a label embedding to the time embedding before the resnets'
        # projections, so their "temporal" features depend on (t, label)
        from ..conditioning import is_class_conditional

        self.class_embedding = model.class_embedding if is_class_conditional(model) else None

    def _dit(self, model: nn.Module) -> None:
        from diffusers.models.normalization import AdaLayerNormZero

        self.kind = "dit"
        self.norms = [m for m in model.modules() if isinstance(m, AdaLayerNormZero)]
        if not self.norms or any(m.emb is None for m in self.norms):
            raise GacqError("TFMQ-DM's temporal block on a DiT needs adaLN-Zero blocks with their own timestep-label "
                            "embedding (norm_type='ada_norm_zero')")
        self.proj_out_1 = getattr(model, "proj_out_1", None)
        self.dtype = next(self.norms[0].linear.parameters()).dtype

    def layers(self) -> list[QuantLayer]:
        """Quantized layers of the TIB (float ones are left out)."""
        if self.kind == "dit":
            mods = [x for n in self.norms for x in (n.emb.timestep_embedder.linear_1, n.emb.timestep_embedder.linear_2,
                                                      n.linear)] + [self.proj_out_1]
        else:
            mods = [self.time_embedding.linear_1, self.time_embedding.linear_2] + \
                [r.time_emb_proj for _, r in self.resnets]
        return [m for m in mods if isinstance(m, QuantLayer)]

    def forward(self, t: torch.Tensor, labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The temporal features (one N x C tensor per resnet or adaLN block) for timesteps t (N,) and labels."""
        if self.kind == "dit":
            if labels is None:
                raise GacqError("the DiT is class-conditional: its temporal block needs the samples' labels")
            conds = [n.emb(t, labels, hidden_dtype=self.dtype) for n in self.norms]
            outs = [n.linear(n.silu(c)) for n, c in zip(self.norms, conds)]
            if self.proj_out_1 is not None:
                outs.append(self.proj_out_1(nn.functional.silu(conds[0])))
            return outs
        emb = self.time_embedding(self.time_proj(t).to(self.dtype))
        if self.class_embedding is not None:
            if labels is None:
                raise GacqError("the model is class-conditional: its temporal block needs the samples' labels")
            emb = emb + self.class_embedding(labels).to(emb.dtype)
        outs = []
        for _, r in self.resnets:
            e = emb if r.skip_time_act else r.nonlinearity(emb)
            outs.append(r.time_emb_proj(e))
        return outs


def tib_loss(outs: list[torch.Tensor], targets: list[torch.Tensor], p: float) -> torch.Tensor:
    """Per-sample sum over temporal features of the baselines' lp loss (TFMQ-DM's LossFuncTimeEmbedding)."""
    return sum(lp_loss_per_sample(o, tg, p) for o, tg in zip(outs, targets))


def reconstruct_tib(q_model: nn.Module, fp_model: nn.Module, t: torch.Tensor, cfg: ReconConfig,
                    sample_weights: torch.Tensor | None = None, device: torch.device | str = "cpu",
                    progress: bool = True, labels: torch.Tensor | None = None) -> dict:
    """TIAR: joint AdaRound of the TIB's quantized linears on the calibration timesteps t.

    Leaves the TIB layers hard-rounded and marked `recon_frozen`. Returns the loss before/after.
    """
    device = torch.device(device)
    q, f = TIB(q_model), TIB(fp_model)
    layers = q.layers()
    if not layers:
        raise GacqError("the temporal block has no quantized layers (all kept in float?)")
    t = t.to(device)
    labels = labels.to(device) if labels is not None else None
    n = len(t)
    w = (sample_weights if sample_weights is not None else torch.full((n,), 1.0 / n)).to(device)
    with torch.no_grad():
        targets = [x.detach() for x in f.forward(t, labels)]

    def losses(idx):
        lab = labels[idx] if labels is not None else None
        return n * w[idx] * tib_loss(q.forward(t[idx], lab), [tg[idx] for tg in targets], cfg.p)

    def full() -> float:
        with torch.no_grad():
            return float(sum(losses(torch.arange(lo, min(n, lo + 1024), device=device)).sum()
                             for lo in range(0, n, 1024))) / n

    for m in layers:
        m.w_quant = True
    before = full()
    with tqdm(total=cfg.iters, desc="TIB reconstruction", unit="it", disable=not progress, leave=False) as bar:
        adaround_optimise(layers, lambda idx: losses(idx).mean(), batch_plan(n, cfg.iters, cfg.batch_size, cfg.seed,
                                                                               device), cfg,
                          "temporal-block reconstruction", bar=bar)
    for m in layers:
        m.recon_frozen = True
    return {"unit": "temporal_information_block", "layers": len(layers), "loss_before": before, "loss_after": full()}


def freeze_tib(model: nn.Module) -> list[QuantLayer]:
    """Mark the TIB's quantized layers `recon_frozen` (after loading a finished TIB from a checkpoint)."""
    layers = TIB(model).layers()
    for m in layers:
        m.recon_frozen = True
    return layers
