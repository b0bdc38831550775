"""`quantize`: one entry point from a float model, a QuantConfig and calibration data to a quantized model."""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import asdict, dataclass, field

import torch

from ..errors import GacqError
from ..models import LoadedModel
from .calib_data import CalibDataConfig, CalibrationSet
from .recon import ReconConfig, reconstruct_model
from .wrap import init_act_quantizers_minmax, observe_input_ranges, quant_layers, set_quant_state, wrap_layers

# Methods implemented so far; the baselines and GAC are added here as they land.
# 'brecq' is gacq's generic weight reconstruction (AdaRound per block, BRECQ-style, min-max
# activation init); it is not one of the paper's baselines, which add their own choices on top.
METHODS = ("rtn", "brecq")
PLANNED = ("ptq4dm", "qdiffusion", "tfmq", "gac")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Attributes:
        method: 'rtn' (round-to-nearest on the initialised grid) or 'brecq' (AdaRound block
            reconstruction of the weights, then min-max activation ranges).
        wbits: weight bits (2..8), per output channel, asymmetric.
        abits: input-activation bits (2..8), per tensor; None keeps activations in float (W-only).
        weight_init: 'mse' (clipping search, Lp 2.4) or 'minmax'.
        a_symmetric: symmetric activation grids.
        skip: fnmatch patterns of layer names kept in full precision (e.g. 'conv_in', 'time_embedding.*').
        calib: how calibration data are collected when none is given.
        calib_batch_size: samples per forward while observing activation ranges.
    """

    method: str = "rtn"
    wbits: int = 4
    abits: int | None = 8
    weight_init: str = "mse"
    a_symmetric: bool = False
    skip: tuple[str, ...] = ()
    calib: CalibDataConfig = field(default_factory=lambda: CalibDataConfig(n_trajectories=64, n_steps=20))
    calib_batch_size: int = 64
    recon: ReconConfig = field(default_factory=ReconConfig)
    recon_checkpoints: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            extra = f" ({self.method} is planned, not implemented yet)" if self.method in PLANNED else ""
            raise GacqError(f"unknown method {self.method!r}{extra}; available: {', '.join(METHODS)}")
        if not 2 <= self.wbits <= 8:
            raise GacqError(f"--wbits {self.wbits} is not supported; use 2 to 8")
        if self.abits is not None and not 2 <= self.abits <= 8:
            raise GacqError(f"--abits {self.abits} is not supported; use 2 to 8, or 32 for float activations")
        if self.weight_init not in ("mse", "minmax"):
            raise GacqError(f"--weight-init must be 'mse' or 'minmax', not {self.weight_init!r}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["skip"] = list(self.skip)
        return d


def quantize(loaded: LoadedModel, config: QuantConfig, calib: CalibrationSet | None = None,
             device: torch.device | str = "cpu") -> torch.nn.Module:
    """Return a quantized copy of `loaded.model` (the float model is left as it was).

    Activation quantization needs `calib` (model inputs x_t and timesteps t); weight-only does not.
    """
    model = copy.deepcopy(loaded.model).to(device).eval()
    skip = (lambda name, m: any(fnmatch.fnmatchcase(name, p) for p in config.skip)) if config.skip else None
    wrap_layers(model, config.wbits, config.abits, skip=skip, a_symmetric=config.a_symmetric)
    for _, m in quant_layers(model):
        m.init_weight(config.weight_init)
    set_quant_state(model, weights=True, acts=False)
    if config.method == "brecq":
        if calib is None or len(calib) == 0:
            raise GacqError("brecq reconstruction needs calibration data (run `gacq calib`)")
        fp = loaded.model
        if next(fp.parameters()).device != torch.device(device):
            fp = copy.deepcopy(fp).to(device)  # leave the caller's model where it is
        reconstruct_model(model, fp, calib.x, calib.t, config.recon,
                          ckpt_dir=config.recon_checkpoints, device=device,
                          fingerprint={"quant": {k: v for k, v in config.to_json().items() if k != "recon"},
                                       "model": loaded.source})
    if config.abits is not None:
        if calib is None or len(calib) == 0:
            raise GacqError("activation quantization needs calibration data (run `gacq calib` or pass --abits 32)")
        bs = config.calib_batch_size
        batches = [(calib.x[i:i + bs].to(device), calib.t[i:i + bs].to(device)) for i in range(0, len(calib), bs)]
        ranges = observe_input_ranges(model, batches, lambda m, x, t: m(x, t))
        init_act_quantizers_minmax(model, ranges)
        set_quant_state(model, weights=True, acts=True)
    return model
