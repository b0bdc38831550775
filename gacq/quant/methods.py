"""The quantization methods, registered by name, each with a `common` and a `faithful` preset.

A method is a recipe (`MethodSpec`): how the weight grid is initialised, whether weights are
reconstructed (AdaRound, BRECQ blocks), whether TFMQ-DM's temporal block is reconstructed first,
how activation quantizers are set (min-max, Q-Diffusion's learned step sizes, TFMQ-DM's per-step
finite set), which calibration timesteps it uses, and which layers it quantizes.

- `common`: every method quantizes the same layers the same way (all Conv2d/Linear at W/A bits
  except the model's input and output layers, which stay in float: conv_in and conv_out of a UNet,
  pos_embed.proj and proj_out_2 (proj_out) of a DiT (PixArt-style transformer); attention matmuls in float; asymmetric
  per-tensor activations; MSE-searched weight grids; eval mode), so differences come from the
  methods, not the bookkeeping. The comparison table uses it.
- `faithful`: what the released code of the method does (baselines.md §0, §1.4, §7), where gacq
  supports it; each deviation is listed in `MethodSpec.deviations` and written into the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..errors import GacqError

if TYPE_CHECKING:  # torch only where a model is given: the method table loads without it (`gacq experiment list`)
    from torch import nn

PRESETS = ("common", "faithful")
# the input and output layers per model class: UNet2DModel / UNet2DConditionModel; DiTTransformer2DModel (patch
# embedding, final linear; its proj_out_1 is the final adaLN modulation, quantized like every block's);
# Transformer2DModel (PixArt-style: proj_out is its final linear). Patterns match whole names: a UNet's nested
# attentions.*.proj_out are not top-level and stay quantized.
COMMON_SKIP = ("conv_in", "conv_out", "pos_embed.proj", "proj_out_2", "proj_out")


@dataclass(frozen=True)
class MethodSpec:
    """One method's recipe. Names follow baselines.md."""

    name: str
    preset: str
    calib_selection: str = "uniform"  # uniform | gaussian | all
    gaussian_mu: float = 0.4  # PTQ4DM's released script
    gaussian_sigma: float = 0.4
    weight_init: str = "mse"
    weight_recon: bool = False  # AdaRound block reconstruction
    tib: bool = False  # TFMQ-DM temporal information block reconstruction (TIAR), first
    act_mode: str = "minmax"  # minmax | lsq | fsc
    act_init_samples: int | None = None  # min-max init on this many random samples (None: all)
    a_symmetric: bool = False
    split_shortcuts: bool = False
    attn_quant: bool = False
    softmax_bits: int = 8
    skip: tuple[str, ...] = COMMON_SKIP  # fnmatch patterns kept in float (weights and inputs)
    skip_fn: str | None = None  # a named rule adding float layers by module type (see float_layers)
    act_skip_fn: str | None = None  # a named rule for layers whose inputs stay float
    eight_bit: tuple[str, ...] = ()  # layers at W8A8 whatever wbits/abits are
    gac: bool = False  # learned per-sample loss weights in block reconstruction (GAC, method.md)
    deviations: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        for k in ("skip", "eight_bit", "deviations"):
            d[k] = list(d[k])
        return d


def _common(name: str, **kw) -> MethodSpec:
    return MethodSpec(name=name, preset="common", **kw)


METHOD_DOCS = {
    "rtn": "round-to-nearest weights on the MSE-searched grid; min-max activation ranges on the calibration data",
    "brecq": "gacq's generic AdaRound block reconstruction (weights) + min-max activations; not a paper baseline",
    "ptq4dm": "PTQ4DM: Gaussian-distributed calibration timesteps + reconstruction",
    "qdiffusion": "Q-Diffusion: uniform timesteps, AdaRound/BRECQ, learned activation step sizes, split shortcuts",
    "tfmq": "TFMQ-DM: temporal-block reconstruction, BRECQ blocks, per-step activation sets (finite set calibration)",
    "gac": "GAC: TFMQ-DM with learned per-sample weights (bilevel, gradient-aligned) in every block's reconstruction",
}

_SPECS: dict[tuple[str, str], MethodSpec] = {
    ("rtn", "common"): _common("rtn"),
    ("rtn", "faithful"): MethodSpec("rtn", "faithful", skip=(), deviations=(
        "no released code: round-to-nearest with the searched clipping on every layer",)),
    ("brecq", "common"): _common("brecq", weight_recon=True),
    ("brecq", "faithful"): MethodSpec("brecq", "faithful", weight_recon=True, skip=(), deviations=(
        "gacq's own generic recipe; there is no released diffusion code to follow",)),
    ("ptq4dm", "common"): _common("ptq4dm", calib_selection="gaussian", weight_recon=True, act_mode="lsq",
                                  act_init_samples=64),
    ("ptq4dm", "faithful"): MethodSpec(
        "ptq4dm", "faithful", calib_selection="gaussian", weight_recon=False, act_mode="minmax", a_symmetric=True,
        skip=(), eight_bit=("conv_in", "conv_out"),
        deviations=("weights stay asymmetric per channel (PTQ4DM's QDrop base uses symmetric weights)",
                    "the recorded t is the true timestep of x (the released code feeds a loop counter)",
                    "network-output quantization: gacq never quantizes outputs, so nothing to disable")),
    ("qdiffusion", "common"): _common("qdiffusion", weight_recon=True, act_mode="lsq", act_init_samples=64,
                                      split_shortcuts=True),
    ("qdiffusion", "faithful"): MethodSpec(
        "qdiffusion", "faithful", weight_init="minmax", weight_recon=True, act_mode="lsq", act_init_samples=64,
        a_symmetric=True, split_shortcuts=True, attn_quant=True, softmax_bits=8, skip=(),
        deviations=("eval mode during reconstruction (the released code runs it in train mode, dropout on)",
                    "the split layer's rounding regulariser covers both halves (the code omits the second)")),
    ("tfmq", "common"): _common("tfmq", calib_selection="all", weight_recon=True, tib=True, act_mode="fsc"),
    ("tfmq", "faithful"): MethodSpec(
        "tfmq", "faithful", calib_selection="all", weight_recon=True, tib=True, act_mode="fsc",
        skip=("conv_in", "conv_out"), skip_fn="tfmq", act_skip_fn="tfmq",
        deviations=("per-step calibration samples share trajectories (the code draws fresh noise for each step)",
                    "per-step ranges are observed with preceding activations in float; the MSE pre-init "
                    "the code overwrites is skipped")),
}

_SPECS[("gac", "common")] = replace(_SPECS[("tfmq", "common")], name="gac", gac=True)
_SPECS[("gac", "faithful")] = replace(_SPECS[("tfmq", "faithful")], name="gac", gac=True, deviations=(
    "the paper's code is not public: TFMQ-DM's faithful recipe plus GAC as method.md specifies",
    *_SPECS[("tfmq", "faithful")].deviations))

METHODS = tuple(sorted({k[0] for k in _SPECS}))


def method_spec(name: str, preset: str = "common") -> MethodSpec:
    """The recipe of method `name` under `preset` ('common' or 'faithful')."""
    if preset not in PRESETS:
        raise GacqError(f"unknown preset {preset!r}; choose {' or '.join(PRESETS)}")
    if (name, preset) not in _SPECS:
        raise GacqError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return _SPECS[(name, preset)]


def float_layers(model: nn.Module, rule: str | None) -> set[str]:
    """Layer names a named rule keeps in float, found by module type.

    'tfmq' (weights and inputs float): the time-embedding input layer (TimestepEmbedding.linear_1),
    every resnet shortcut conv and every downsampler conv (TFMQ-DM's 'skip'/'shortcut'/'op' and
    downsample.conv exclusions, baselines.md §1.4).
    """
    if rule is None:
        return set()
    if rule != "tfmq":
        raise GacqError(f"unknown layer rule {rule!r}")
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.embeddings import TimestepEmbedding
    from diffusers.models.resnet import ResnetBlock2D
    from torch import nn

    names = set()
    for n, m in model.named_modules():
        if isinstance(m, TimestepEmbedding):
            names.add(f"{n}.linear_1")
        elif isinstance(m, ResnetBlock2D) and m.conv_shortcut is not None:
            names.add(f"{n}.conv_shortcut")
        elif isinstance(m, Downsample2D) and isinstance(getattr(m, "conv", None), nn.Conv2d):
            names.add(f"{n}.conv")
    return names


def float_input_layers(model: nn.Module, rule: str | None) -> set[str]:
    """Layer names whose inputs a named rule keeps in float.

    'tfmq': the time embedding's second linear and the first resnet block's conv1 (TFMQ-DM's
    `disable_out_quantization` entries [1] and [3] in the DDIM layout).
    """
    if rule is None:
        return set()
    from diffusers.models.embeddings import TimestepEmbedding
    from diffusers.models.resnet import ResnetBlock2D

    names = {f"{n}.linear_2" for n, m in model.named_modules() if isinstance(m, TimestepEmbedding)}
    first = next((n for n, m in model.named_modules() if isinstance(m, ResnetBlock2D)), None)
    if first is not None:
        names.add(f"{first}.conv1")
    return names


def with_overrides(spec: MethodSpec, **kw) -> MethodSpec:
    """A copy of `spec` with user overrides (None values ignored)."""
    return replace(spec, **{k: v for k, v in kw.items() if v is not None})
