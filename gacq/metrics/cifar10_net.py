"""The project's CIFAR-10 feature network: a ResNet-9-style classifier (Page, "How to train
your ResNet", DAWNBench 2018), trained by `gacq train-classifier` and shipped in
`gacq/assets/cifar10-features/` as fp16 safetensors.

It plays the role Inception-v3 plays for FID while Inception weights cannot be had:
- `pool`: the 384-d global-max-pooled penultimate features (FID, precision/recall);
- `spatial`: the first 8 channels of the 8x8 map after layer 2 (512-d; sFID, as ADM takes
  the first 7 channels of Inception's mixed_6/conv map);
- `logits`: the 10 class logits (Inception Score).

Figures from this network are only comparable with other figures from the same weights
(`feature_hash`), never with published Inception FIDs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import GacqError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
DEFAULT_WIDTHS = (64, 128, 256, 384)
SPATIAL_CHANNELS = 8


def _conv_bn(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.a = _conv_bn(ch, ch)
        self.b = _conv_bn(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(self.a(x))


class Cifar10Net(nn.Module):
    """ResNet-9: prep -> layer1 (+res) -> layer2 -> layer3 (+res) -> global max pool -> linear.

    Input: float images in [0, 1], N x 3 x 32 x 32 (normalised inside).
    """

    def __init__(self, widths: tuple[int, int, int, int] = DEFAULT_WIDTHS, num_classes: int = 10,
                 flip_tta: bool = True):
        super().__init__()
        self.flip_tta = flip_tta
        w0, w1, w2, w3 = widths
        self.widths = tuple(widths)
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1), persistent=False)
        self.prep = _conv_bn(3, w0)
        self.layer1 = nn.Sequential(_conv_bn(w0, w1, pool=True), Residual(w1))
        self.layer2 = _conv_bn(w1, w2, pool=True)
        self.layer3 = nn.Sequential(_conv_bn(w2, w3, pool=True), Residual(w3))
        self.fc = nn.Linear(w3, num_classes, bias=False)
        self.logit_scale = 0.125  # Page's output scaling

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """All taps at once: pool (N x w3), spatial (N x 8*8*8), logits (N x classes).

        In eval mode with `flip_tta` (the default for the shipped network) every tap is the
        mean over the image and its mirror image (the mirrored spatial map flipped back), so
        the features do not depend on left-right orientation.
        """
        if self.flip_tta and not self.training:
            a, b = self._taps(x), self._taps(x.flip(3))
            b["spatial"] = b["spatial"].flip(3)
            return {k: ((a[k] + b[k]) / 2).flatten(1) for k in a}
        return {k: v.flatten(1) for k, v in self._taps(x).items()}

    def _taps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (x - self.mean) / self.std
        h2 = self.layer2(self.layer1(self.prep(x)))
        h3 = self.layer3(h2)
        pool = torch.amax(h3, dim=(2, 3))
        logits = self.fc(pool) * self.logit_scale
        spatial = h2[:, :SPATIAL_CHANNELS]
        return {"pool": pool, "spatial": spatial, "logits": logits}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)["logits"]


def bundled_features_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "cifar10-features"


def save_cifar10_net(net: Cifar10Net, folder: str | Path, extra: dict | None = None) -> None:
    """Write `model.safetensors` (fp16) and `config.json` into `folder` (which must exist)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    cfg = {"architecture": "resnet9", "widths": list(net.widths), "num_classes": net.fc.out_features,
           "spatial_channels": SPATIAL_CHANNELS, "flip_tta": net.flip_tta, **(extra or {})}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_cifar10_net(folder: str | Path | None = None, device: str | torch.device = "cpu") -> Cifar10Net:
    """Load the classifier from `folder` (default: the bundled one), in float32 eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else bundled_features_path()
    cfg_path, w_path = folder / "config.json", folder / "model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise GacqError(
            f"{folder} is not a CIFAR-10 feature network folder (needs config.json and model.safetensors); "
            "train one with `gacq train-classifier` or use the bundled one"
        )
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("architecture") != "resnet9":
        raise GacqError(f"{cfg_path}: unknown architecture {cfg.get('architecture')!r} (expected 'resnet9')")
    net = Cifar10Net(tuple(cfg["widths"]), cfg.get("num_classes", 10), cfg.get("flip_tta", True))
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise GacqError(f"cannot read {w_path}: {e}") from e
    try:
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as e:
        raise GacqError(f"{w_path} does not match the architecture in {cfg_path}: {e}") from e
    return net.to(device).eval()


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4, cutout: int = 0) -> torch.Tensor:
    """Random crop (reflect padding), horizontal flip and optional cutout (a `cutout` x `cutout`
    square set to the data mean) of a uint8 batch N x C x H x W, on its device; returns float 0..255."""
    n, c, h, w = x.shape
    xp = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    dev = x.device
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    out = xp[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=gen, device=dev) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(3), out)
    if cutout > 0:
        cy = torch.randint(0, h, (n,), generator=gen, device=dev)[:, None, None, None]
        cx = torch.randint(0, w, (n,), generator=gen, device=dev)[:, None, None, None]
        yy = torch.arange(h, device=dev)[None, None, :, None]
        xx = torch.arange(w, device=dev)[None, None, None, :]
        hole = ((yy - cy).abs() * 2 < cutout) & ((xx - cx).abs() * 2 < cutout)
        fill = torch.tensor(CIFAR_MEAN, device=dev).view(1, 3, 1, 1) * 255
        out = torch.where(hole, fill, out)
    return out
