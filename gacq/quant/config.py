"""The quantization settings as plain dataclasses, without torch: `QuantConfig` and the configs it holds (calibration
collection, AdaRound and activation reconstruction, GAC). Their modules (`calib_data`, `recon`, `gac`, `api`)
re-export them; they live here so that checking a recipe (`gacq experiment list` on a spec with recipe overrides,
`gacq.experiment.load_spec`) needs no torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import GacqError
from .methods import MethodSpec, method_spec, with_overrides

SELECTIONS = ("uniform", "gaussian", "all")
FORMATS = ("int", "fp8")  # number formats of quantized weights and inputs (`gacq.quant.primitives`)


@dataclass(frozen=True)
class CalibDataConfig:
    """What to collect.

    Attributes:
        selection: 'uniform', 'gaussian' or 'all'.
        n_trajectories: trajectories to run (Q-Diffusion: 256 per step on CIFAR-10).
        n_steps: recorded steps for 'uniform' (Q-Diffusion: 20 of 100).
        mu, sigma: mean and std of the Gaussian timestep draw, as fractions of T ('gaussian').
        draws: Gaussian draws per trajectory ('gaussian'; 1 = PTQ4DM's one sample per trajectory).
        seed: trajectories use per-sample seeds derived from it; the Gaussian draw uses it too.
        batch_size: trajectories per model call.
    """

    selection: str = "uniform"
    n_trajectories: int = 256
    n_steps: int = 20
    mu: float = 0.5
    sigma: float = 0.35
    seed: int = 0
    batch_size: int = 64
    draws: int = 1

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise GacqError(f"unknown calibration selection {self.selection!r}; choose {', '.join(SELECTIONS)}")
        if self.n_trajectories < 1 or self.n_steps < 1 or self.batch_size < 1 or self.draws < 1:
            raise GacqError("calibration counts (trajectories, steps, batch size, draws) must be at least 1")
        if self.sigma <= 0:
            raise GacqError(f"sigma must be positive, got {self.sigma}")


@dataclass(frozen=True)
class ReconConfig:
    """AdaRound block reconstruction (defaults: the baselines' weight stage, baselines.md §1.3)."""

    iters: int = 20000
    batch_size: int = 32
    lr: float = 1e-3
    reg_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    p: float = 2.0
    seed: int = 0
    cuda_graph: bool = True  # capture the step as a CUDA graph on GPUs (results as eager, much faster)


@dataclass(frozen=True)
class ActReconConfig:
    """Activation step-size learning (Q-Diffusion's act stage, baselines.md §2.3): Adam on the
    input quantizers' step sizes with a cosine schedule, Lp loss with p = 2.4, FP inputs."""

    iters: int = 5000
    batch_size: int = 32
    lr: float = 4e-4
    p: float = 2.4
    seed: int = 0
    cuda_graph: bool = True


@dataclass(frozen=True)
class GACConfig:
    """GAC hyperparameters (paper values where it gives them).

    Attributes:
        tau: softmax temperature of the weights (paper: 1 best of 0.2, 0.5, 1, 2).
        init_score: initial score of every sample (paper: 1/32; any constant gives uniform weights).
        val_fraction: share of the calibration set held out for validation, balanced over
            sampling steps (paper: 5% best of 2, 5, 10, 20%).
        groups: K, timestep groups of the validation split (paper: 5).
        meta_iters: M, meta-iterations per block (0: plain TFMQ-DM).
        inner_lr: eta, step size of the differentiable inner update of the rounding variables.
        meta_lr: Adam learning rate of the scores.
        batch_size: minibatch of calibration samples per meta-iteration; minibatches run through
            successive random permutations (epochs), so M x batch_size >= N visits every sample.
        meta_optimizer: 'adam' (default): Adam on the minibatch's scores only (lazy moments, as
            torch.optim.SparseAdam); 'sgd'; 'dense-adam': Adam on all N scores. Dense Adam was
            the first implementation and is kept for comparison: the softmax normaliser gives
            every score outside the minibatch a tiny gradient of one sign, which Adam's
            per-coordinate normalisation turns into full-size steps, so all never-visited samples
            drift together (on the H100 run with M=100, B=32, N=4860 about half the samples were
            never visited and ended at 0.47x the uniform weight: the weights measured the visit
            lottery, not gradient alignment). 'sgd' and 'adam' leave unvisited scores unchanged.
        val_batch: validation samples per group per meta-iteration (None: all of the group).
        p: exponent of the per-sample loss (the reconstruction's).
        seed: minibatch and validation-subsample order.
    """

    tau: float = 1.0
    init_score: float = 1.0 / 32
    val_fraction: float = 0.05
    groups: int = 5
    meta_iters: int = 100
    inner_lr: float = 1.0
    meta_lr: float = 0.2
    batch_size: int = 32
    meta_optimizer: str = "adam"
    val_batch: int | None = 32
    p: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise GacqError(f"GAC temperature tau must be positive, got {self.tau}")
        if not 0 < self.val_fraction < 1:
            raise GacqError(f"GAC validation fraction must be in (0, 1), got {self.val_fraction}")
        if self.groups < 2:
            raise GacqError(f"GAC needs at least 2 timestep groups (K), got {self.groups}")
        if self.meta_iters < 0 or self.batch_size < 1:
            raise GacqError("GAC meta-iterations must be >= 0 and the batch size >= 1")
        if self.inner_lr <= 0:
            raise GacqError(f"GAC inner step size must be positive, got {self.inner_lr}")
        if self.meta_optimizer not in ("adam", "sgd", "dense-adam"):
            raise GacqError(f"GAC meta optimiser must be adam, sgd or dense-adam, not {self.meta_optimizer!r}")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Attributes:
        method: a registered method (`gacq.quant.methods.METHODS`).
        preset: 'common' (the comparison's shared layer set and choices) or 'faithful' (the
            released code's choices).
        wbits: weight bits (2..8), per output channel, asymmetric.
        abits: input-activation bits (2..8), per tensor; None keeps activations in float (W-only).
        weight_init, a_symmetric, skip: override the recipe (None keeps it). skip: fnmatch
            patterns of layer names kept in full precision.
        act_mode, split_shortcuts: override the recipe's activation quantizer and shortcut splitting (None keeps
            it), for ablations across recipes: act_mode 'minmax' (calibrated ranges), 'lsq' (learned step sizes,
            Q-Diffusion's and PTQ4DM's) or 'fsc' (TFMQ-DM's per-step sets; methods that calibrate on every step
            only); split_shortcuts gives the concatenated skip inputs of the up blocks two separately quantized
            halves (Q-Diffusion's). Finite set calibration does not take split layers.
        calib: how calibration data are collected when none is given (selection None: the recipe's).
        calib_batch_size: samples per forward while observing activation ranges.
        recon: AdaRound settings of the weight stage (and of TFMQ-DM's temporal block).
        act_recon: learned activation step sizes (Q-Diffusion's act stage).
        fsc_momentum, fsc_batch_size: TFMQ-DM's per-step range EMA.
        gac: GAC's hyperparameters (method 'gac').
        recon_checkpoints: folder of per-unit resume points.
        smooth: SmoothQuant's migration strength alpha in [0, 1] (`gacq.quant.smooth`): before anything else,
            every Linear layer with a quantized input divides it per channel by max|X_j|^a / max|W_j|^(1-a)
            (measured on up to `smooth_samples` calibration samples) and takes the factor into its weight.
            None: off. Not part of any paper's method; the export backends do not run smoothed layers yet.
        smooth_layers: fnmatch patterns of the layers to smooth (None: every eligible Linear).
        act_granularity: 'tensor' (one stored grid per layer input, calibrated: the papers' choice) or 'token'
            (every quantized Linear's input gets one grid per token, computed per call from that token's min and
            max: dynamic per-token quantization, as LLM and DiT quantizers use against outlier tokens; convolutions
            keep per-tensor grids). Not part of any paper's method here.
        bias_correction: after everything else, measure the per-channel mean error of the noise
            prediction against the float model on the calibration set and fold it into the last
            layer's bias (`gacq.quant.bias_correction`; not part of any paper's method).
        w8_layers: fnmatch patterns of quantized layers whose weights take 8 bits instead of `wbits` (mixed
            precision; their inputs keep `abits`). Each pattern must match at least one quantized layer. None: off.
            Not part of any paper's method. `w8_checkpoint` applies it to a finished checkpoint instead.
        fmt: the number format of every quantized weight and input: 'int' (uniform integer grids, the papers') or
            'fp8' (FP8 E4M3, the 8-bit float of Hopper's and Ada's tensor cores: per-output-channel weight scales
            max|W| / 448 or MSE-searched, per-tensor input scales max|x| / 448 from the calibration data). fp8 takes
            8-bit weights and 8-bit (or float) inputs and recipes without learned rounding (rtn, ptq4dm's faithful
            preset). Not part of any paper's method.
        act_fmt: the inputs' number format where it differs from `fmt` (None: `fmt`'s). 'fp8' with integer weights
            gives e.g. W4 weights (learned rounding and all) with FP8 E4M3 inputs: 4-bit weight codes minus their
            zero point are integers of at most 15 in magnitude, exact in FP8, so the `fp8` backend runs such layers
            on FP8 tensor cores. Needs 8-bit inputs. FP8 weights take FP8 inputs only.
    """

    method: str = "rtn"
    preset: str = "common"
    wbits: int = 4
    abits: int | None = 8
    weight_init: str | None = None
    a_symmetric: bool | None = None
    skip: tuple[str, ...] | None = None
    act_mode: str | None = None
    split_shortcuts: bool | None = None
    calib: CalibDataConfig = field(default_factory=lambda: CalibDataConfig(n_trajectories=64, n_steps=20))
    calib_batch_size: int = 64
    recon: ReconConfig = field(default_factory=ReconConfig)
    act_recon: ActReconConfig = field(default_factory=ActReconConfig)
    fsc_momentum: float = 0.95
    fsc_batch_size: int = 16
    gac: GACConfig = field(default_factory=GACConfig)
    recon_checkpoints: str | None = None
    bias_correction: bool = False
    smooth: float | None = None
    smooth_layers: tuple[str, ...] | None = None
    smooth_samples: int = 256
    act_granularity: str = "tensor"
    w8_layers: tuple[str, ...] | None = None
    fmt: str = "int"
    act_fmt: str | None = None

    def __post_init__(self) -> None:
        s = self.spec()  # validates method and preset
        self._check_format(s)
        if self.w8_layers is not None:
            if isinstance(self.w8_layers, str) or not self.w8_layers \
                    or not all(isinstance(p, str) and p for p in self.w8_layers):
                raise GacqError("--w8-layer takes layer-name patterns (e.g. 'up_blocks.3.resnets.*.conv_shortcut'); "
                                f"got {self.w8_layers!r}")
            if self.wbits == 8:
                raise GacqError("--w8-layer raises chosen layers to 8-bit weights; with --wbits 8 every layer already "
                                "has them: drop --w8-layer")
        if self.act_granularity not in ("tensor", "token"):
            raise GacqError(f"--act-granularity must be 'tensor' or 'token', not {self.act_granularity!r}")
        if self.act_granularity == "token" and self.abits is None:
            raise GacqError("--act-granularity token quantizes activations per token; with float activations (A32) "
                            "there are none to quantize: drop it or quantize the activations")
        if not 2 <= self.wbits <= 8:
            raise GacqError(f"--wbits {self.wbits} is not supported; use 2 to 8")
        if self.abits is not None and not 2 <= self.abits <= 8:
            raise GacqError(f"--abits {self.abits} is not supported; use 2 to 8, or 32 for float activations")
        if self.smooth is not None:
            if not 0.0 <= self.smooth <= 1.0:
                raise GacqError(f"--smooth {self.smooth} is outside [0, 1]; SmoothQuant's usual strength is 0.5")
            if self.abits is None:
                raise GacqError("--smooth balances the quantized inputs' channels; with float activations (A32) "
                                "there is nothing to balance: drop --smooth or quantize the activations")
        if self.weight_init not in (None, "mse", "minmax"):
            raise GacqError(f"--weight-init must be 'mse' or 'minmax', not {self.weight_init!r}")
        if self.act_mode not in (None, "minmax", "lsq", "fsc"):
            raise GacqError(f"--act-mode must be 'minmax', 'lsq' or 'fsc', not {self.act_mode!r}")
        if self.split_shortcuts not in (None, True, False):
            raise GacqError(f"split_shortcuts must be true or false, not {self.split_shortcuts!r}")
        if s.act_mode == "fsc" and s.calib_selection != "all":
            raise GacqError(f"--act-mode fsc (TFMQ-DM's per-step activation sets) needs calibration samples at every "
                            f"sampling step; method {self.method} calibrates on '{s.calib_selection}' timesteps: use "
                            "--act-mode lsq or minmax, or method tfmq / gac")
        if s.act_mode == "fsc" and s.split_shortcuts:
            raise GacqError(f"method {self.method} with split shortcuts and --act-mode fsc: finite set calibration "
                            "does not support split layers; use --act-mode lsq (or minmax) with --split-shortcuts, or "
                            "--no-split-shortcuts")

    def _check_format(self, s: MethodSpec) -> None:
        if self.fmt not in FORMATS:
            raise GacqError(f"--format must be {' or '.join(FORMATS)}, not {self.fmt!r}")
        if self.act_fmt not in (None, *FORMATS):
            raise GacqError(f"--act-format must be {' or '.join(FORMATS)}, not {self.act_fmt!r}")
        if self.fmt == "fp8":
            if self.act_fmt == "int":
                raise GacqError("FP8 weights take FP8 inputs (the fp8 backend multiplies FP8 by FP8): drop "
                                "--act-format int")
            if self.wbits != 8 or self.abits not in (8, None):
                raise GacqError(f"--format fp8 quantizes to FP8 E4M3, an 8-bit format: use --wbits 8 and --abits 8 "
                                f"(or 32), not W{self.wbits}A{self.abits or 32}")
            if s.weight_recon or s.tib:
                raise GacqError(f"--format fp8 rounds weights to nearest; method {self.method} ({self.preset}) learns "
                                "roundings on an integer grid (AdaRound): use --method rtn, or --format int (with "
                                "--act-format fp8 for FP8 inputs)")
        if self.input_format == "fp8" and (self.abits is not None or self.act_fmt is not None):
            if self.abits != 8:
                raise GacqError(f"--act-format fp8: FP8 E4M3 inputs are 8-bit; use --abits 8, not {self.abits or 32}")
            if self.act_granularity != "tensor":
                raise GacqError("FP8 inputs have per-tensor input scales only: drop --act-granularity token")

    @property
    def input_format(self) -> str:
        """The inputs' number format: `act_fmt`, else `fmt`."""
        return self.act_fmt or self.fmt

    def needs_calibration(self) -> bool:
        """Any reconstruction or activation quantization needs calibration data."""
        s = self.spec()
        return s.weight_recon or s.tib or self.abits is not None or self.bias_correction

    def spec(self) -> MethodSpec:
        return with_overrides(method_spec(self.method, self.preset), weight_init=self.weight_init,
                              a_symmetric=self.a_symmetric, skip=self.skip, act_mode=self.act_mode,
                              split_shortcuts=self.split_shortcuts)

    def calib_config(self) -> CalibDataConfig:
        """The calibration collection settings, with the recipe's timestep selection."""
        s = self.spec()
        c = asdict(self.calib)
        c["selection"] = s.calib_selection
        if s.calib_selection == "gaussian":
            c["mu"], c["sigma"] = s.gaussian_mu, s.gaussian_sigma
        return CalibDataConfig(**c)

    def to_json(self) -> dict:
        d = asdict(self)
        d["skip"] = None if self.skip is None else list(self.skip)
        if self.smooth is None:  # absent when off: the resume fingerprints of earlier checkpoints stay valid
            for k in ("smooth", "smooth_layers", "smooth_samples"):
                d.pop(k)
        elif self.smooth_layers is not None:
            d["smooth_layers"] = list(self.smooth_layers)
        if self.act_granularity == "tensor":  # absent at the default: earlier resume fingerprints stay valid
            d.pop("act_granularity")
        if self.w8_layers is None:  # absent when off, likewise
            d.pop("w8_layers")
        else:
            d["w8_layers"] = list(self.w8_layers)
        for k in ("act_mode", "split_shortcuts"):  # absent unless given, likewise
            if d[k] is None:
                d.pop(k)
        if self.fmt == "int":  # absent at the default, likewise
            d.pop("fmt")
        if self.act_fmt is None:
            d.pop("act_fmt")
        d["recipe"] = self.spec().to_json()
        return d
