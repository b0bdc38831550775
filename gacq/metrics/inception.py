"""The standard FID Inception-v3 network (TF graph "2015-12-05", ported to torch), in plain torch.

This is the network behind published FID / sFID / Inception Score figures: the architecture
of torch-fidelity's `FeatureExtractorInceptionV3` (Apache-2.0, Anton Obukhov) and of
pytorch-fid's `FIDInceptionA/C/E_1/E_2` (Apache-2.0, Maximilian Seitzer), which both port
the TensorFlow 2015-12-05 Inception graph. The layers, their module/parameter names
(`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, ..., `fc.weight`
[1008 x 2048], `fc.bias`) and the TF-compat pooling patches follow those sources, so the public
weight files load directly:

- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`,
- torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`,
- or a `.safetensors` conversion of either (same keys).

Why we do not import those libraries: torch-fidelity imports torchvision at package import,
and torchvision's PyPI wheel does not load against the CPU torch build used here; and it loads
its weights with `torch.load(weights_only=False)`, i.e. it unpickles arbitrary objects, which
this project refuses to do. pytorch-fid builds its net on torchvision's `Inception3`.

Preprocessing (`resize`):
- "tf1" (TF-FID / torch-fidelity): uint8 -> float -> TF1 `resize_bilinear(align_corners=False)`
  to 299 -> (x - 128) / 128;
- "torch" (pytorch-fid): x / 255 -> `F.interpolate(bilinear, align_corners=False)` to 299
  -> 2x - 1.

No weights ship with gacq and none can be downloaded here: pass a file to `load_inception`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import GacqError
from ..utils import file_sha256  # noqa: F401  (re-exported: the feature-network hash)

INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # ADM's sFID takes the first 7 channels of 'mixed_6/conv' (17 x 17)
NUM_CLASSES = 1008
EXPECTED_FILES = (
    "pt_inception-2015-12-05-6726825d.pth (pytorch-fid), "
    "weights-inception-2015-12-05-6726825d.pth (torch-fidelity), "
    "or a .safetensors conversion of either"
)


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 `tf.image.resize_bilinear(align_corners=False)` of float N x C x H x W to size x size.

    Source coordinate = dst_index * (in / out) (no half-pixel offset), lo = floor, hi = min(lo + 1,
    in - 1), computed in float32 as TF does; the lerp order follows TF's kernel (x first, then y).
    """
    if x.dim() != 4 or not torch.is_floating_point(x):
        raise GacqError(f"resize_bilinear_tf1 expects a float N x C x H x W tensor, got {x.dtype} {tuple(x.shape)}")

    def grid(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(n_in / size, dtype=torch.float32)
        src = torch.arange(size, dtype=torch.float32, device=x.device) * scale.to(x.device)
        lo = src.floor().long().clamp_max(n_in - 1)
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, (src - lo.to(torch.float32)).to(x.dtype)

    ylo, yhi, dy = grid(x.shape[2])
    xlo, xhi, dx = grid(x.shape[3])
    top, bot = x[:, :, ylo, :], x[:, :, yhi, :]
    dx = dx.view(1, 1, 1, size)
    top = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * dx
    bot = bot[..., xlo] + (bot[..., xhi] - bot[..., xlo]) * dx
    return top + (bot - top) * dy.view(1, 1, size, 1)


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool does not count the zero padding in the average.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BN (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class _Block(nn.Module):
    """An Inception block: `branches(x)` returns the branch outputs, forward concatenates them."""

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), 1)


class InceptionA(_Block):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def branches(self, x):
        return [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_tf(x)),
        ]


class InceptionB(_Block):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def branches(self, x):
        return [
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ]


class InceptionC(_Block):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def branches(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return [self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_tf(x))]


class InceptionD(_Block):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def branches(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return [self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)]


class InceptionE(_Block):
    """Mixed_7b (`max_pool=False`: TF avg pool without padding) and Mixed_7c (`max_pool=True`:
    the TF graph uses a 3x3/1 max pool in the pool branch of its last block)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def branches(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        return [
            self.branch1x1(x),
            torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
            torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1),
            self.branch_pool(pooled),
        ]


class FIDInceptionV3(nn.Module):
    """FID Inception-v3. `features(uint8 N x 3 x H x W)` -> {"pool", "spatial", "logits"}."""

    name = "inception"

    def __init__(self, resize: str = "tf1"):
        super().__init__()
        if resize not in ("tf1", "torch"):
            raise GacqError(f"Inception resize must be 'tf1' (TF-FID / torch-fidelity) or 'torch' "
                            f"(pytorch-fid), got {resize!r}")
        self.resize = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, NUM_CLASSES)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x H x W -> float32 N x 3 x 299 x 299 in [-1, 1]."""
        if not torch.is_tensor(x) or x.dtype != torch.uint8:
            raise GacqError(f"Inception expects uint8 images (0..255), got "
                            f"{x.dtype if torch.is_tensor(x) else type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise GacqError(f"Inception expects RGB images N x 3 x H x W, got shape {tuple(x.shape)}")
        x = x.to(device=self.fc.weight.device, dtype=torch.float32)
        if self.resize == "tf1":
            return (resize_bilinear_tf1(x, INPUT_SIZE) - 128) / 128
        x = F.interpolate(x / 255, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.preprocess(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # N x 64 x 147 x 147
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # N x 64 x 73 x 73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # N x 192 x 71 x 71
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # N x 192 x 35 x 35
        for blk in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = blk(x)  # ... N x 768 x 17 x 17
        br = self.Mixed_6d.branches(x)
        # sFID tap: ADM (guided-diffusion evaluator) reads 'mixed_6/conv' of the TF graph and keeps
        # its first 7 channels. By the graph's naming that is Mixed_6d's 1x1 branch conv (after
        # BN + ReLU), 192 x 17 x 17; the correspondence is by name only and unverified without the
        # weights and the TF graph at hand.
        spatial = br[0][:, :SPATIAL_CHANNELS].flatten(1)  # N x 7*17*17 = 2023, channel-major
        x = torch.cat(br, 1)
        for blk in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = blk(x)  # ... N x 2048 x 8 x 8
        pool = x.mean(dim=(2, 3))  # N x 2048 (global average pool)
        logits = pool @ self.fc.weight.T  # N x 1008, torch-fidelity's 'logits_unbiased' (IS)
        return {"pool": pool.float(), "spatial": spatial.float(), "logits": logits.float()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.features(x)


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad user file
            raise GacqError(f"could not read Inception weights {path} as safetensors: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise GacqError(
            f"{path} holds Python objects besides tensors; gacq refuses to unpickle arbitrary objects "
            f"(torch.load weights_only=True failed). Expected a plain state dict: {EXPECTED_FILES}."
        ) from e
    except Exception as e:  # noqa: BLE001
        raise GacqError(f"could not read Inception weights {path}: {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise GacqError(f"{path} does not hold a state dict (got {type(obj).__name__}); expected {EXPECTED_FILES}")
    return obj


def load_inception(weights: str | Path | None, device: str | torch.device = "cpu",
                   resize: str = "tf1") -> FIDInceptionV3:
    """Build FIDInceptionV3 and load a weight file (eval mode, no grad, on `device`)."""
    if weights is None:
        raise GacqError(
            "Inception-v3 weights cannot be downloaded here; pass --inception-weights PATH with "
            "pt_inception-2015-12-05-6726825d.pth (from pytorch-fid), torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth, or a .safetensors conversion of either."
        )
    path = Path(weights)
    if not path.is_file():
        raise GacqError(f"Inception weights file not found: {path}")
    sd = _read_state_dict(path)
    net = FIDInceptionV3(resize=resize)
    # BN's num_batches_tracked is unused in eval and absent from older files: ignore it both ways.
    want = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    if missing or unexpected:
        raise GacqError(
            f"{path} is not an FID Inception-v3 state dict: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}. Expected {EXPECTED_FILES}."
        )
    for k, v in want.items():
        got = sd[k]
        if not torch.is_tensor(got) or got.shape != v.shape:
            shape = tuple(got.shape) if torch.is_tensor(got) else type(got).__name__
            raise GacqError(f"{path}: {k} has shape {shape}, expected {tuple(v.shape)}. "
                            f"Expected {EXPECTED_FILES}.")
    net.load_state_dict(sd, strict=False)
    return net.to(device).eval().requires_grad_(False)
