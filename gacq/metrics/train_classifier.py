"""Training the CIFAR-10 feature network (`gacq train-classifier`).

The recipe of Page's DAWNBench ResNet-9: SGD with Nesterov momentum 0.9, batch 512, a
piecewise-linear learning rate (0 -> peak over the first epochs, then down to 0), weight
decay 5e-4, label smoothing, random crops (reflect padding 4) and flips, bf16 autocast on
CUDA. The data live on the device as uint8; augmentation runs there too, so an epoch on an
H100 is a second or two and the whole run is short enough not to need resuming.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import load_images
from ..errors import GacqError
from ..utils import atomic_dir, git_commit, machine_info, resolve_device, write_json
from .cifar10_net import DEFAULT_WIDTHS, Cifar10Net, augment, save_cifar10_net


@dataclass(frozen=True)
class ClassifierConfig:
    """Settings of a classifier run (saved in config.json next to the weights).

    Attributes:
        data: training images with class labels (folder of class folders, zip, mosaic zip).
        test: held-out images with labels, evaluated every `eval_every` epochs and at the end.
        epochs: passes over the training data.
        batch_size: images per step (the last partial batch of an epoch is dropped).
        lr: peak SGD learning rate; warm-up from 0 over `warmup_epochs`, then linear down to 0.
        momentum, weight_decay, label_smoothing: as named.
        cutout: side of the cutout square (0: none).
        flip_tta: the saved network averages its features over each image and its mirror.
        widths: channel widths of prep, layer1, layer2, layer3.
        seed: seeds the initial weights, data order and augmentation.
        bf16: bf16 autocast on CUDA.
    """

    data: str
    test: str | None = None
    epochs: int = 80
    batch_size: int = 512
    lr: float = 0.4
    warmup_epochs: float = 5.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.2
    cutout: int = 16
    flip_tta: bool = True
    widths: tuple[int, int, int, int] = DEFAULT_WIDTHS
    seed: int = 0
    eval_every: int = 5
    bf16: bool = True


def _labelled(path: str, what: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    ds = load_images(path, size=32, channels=3)
    if ds.labels is None or len(ds.labels) != len(ds.images) or not ds.classes:
        raise GacqError(f"{what} {path} has no class labels; give a folder or zip with one sub-folder per class")
    return ds.images, ds.labels.astype(np.int64), list(ds.classes)


@torch.no_grad()
def classifier_accuracy(net: Cifar10Net, images: np.ndarray, labels: np.ndarray,
                        device: torch.device, batch_size: int = 1000) -> float:
    """Top-1 accuracy of `net` on uint8 N x H x W x 3 images."""
    net.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(labels[i:i + batch_size]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = net(x).argmax(1)
        correct += int((pred == y).sum())
    return correct / len(images)


def train_classifier(cfg: ClassifierConfig, out: str | Path, device: str | None = None) -> dict:
    """Train the feature network and write `out/` (model.safetensors, config.json, log.jsonl, summary.json)."""
    dev = resolve_device(device)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise GacqError(f"{out} exists and is not empty; choose a new --out")
    x_np, y_np, classes = _labelled(cfg.data, "training data")
    test = _labelled(cfg.test, "test data") if cfg.test else None
    if test is not None and test[2] != classes:
        raise GacqError(f"class names differ between {cfg.data} ({classes}) and {cfg.test} ({test[2]})")
    n = len(x_np)
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch < 1:
        raise GacqError(f"{n} training images are fewer than one batch of {cfg.batch_size}; lower --batch-size")
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(cfg.warmup_epochs * steps_per_epoch))

    torch.manual_seed(cfg.seed)
    net = Cifar10Net(cfg.widths, len(classes), cfg.flip_tta).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    x = torch.from_numpy(x_np).to(dev).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(y_np).to(dev)
    amp = cfg.bf16 and dev.type == "cuda"

    log = []
    t0 = time.time()
    with tqdm(total=total, desc="train-classifier", unit="step") as bar:  # closed on an error too
        for epoch in range(cfg.epochs):
            net.train()
            perm = torch.randperm(n, generator=gen, device=dev)
            loss_sum = torch.zeros((), device=dev)
            for i in range(steps_per_epoch):
                idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                xb = (augment(x[idx], gen, cutout=cfg.cutout) / 255).contiguous(memory_format=torch.channels_last)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    loss = F.cross_entropy(net(xb), y[idx], label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach()
                bar.update(1)
            loss_mean = float(loss_sum) / steps_per_epoch
            if not math.isfinite(loss_mean):
                raise GacqError(f"training diverged at epoch {epoch + 1} (loss {loss_mean}); lower --lr")
            row = {"epoch": epoch + 1, "loss": loss_mean, "lr": sched.get_last_lr()[0], "time_s": time.time() - t0}
            if test is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                row["test_acc"] = classifier_accuracy(net, test[0], test[1], dev)
                bar.set_postfix(loss=f"{loss_mean:.3f}", acc=f"{row['test_acc']:.4f}")
            log.append(row)
    wall = time.time() - t0

    net.eval()
    summary = {
        "train_images": n, "epochs": cfg.epochs, "steps": total, "wall_s": wall,
        "final_loss": log[-1]["loss"], "test_acc": log[-1].get("test_acc"),
        "test_images": len(test[0]) if test else 0, "classes": classes,
        "parameters": sum(p.numel() for p in net.parameters()),
        "commit": git_commit(), "machine": machine_info(), "device": str(dev),
    }
    with atomic_dir(out) as tmp:
        save_cifar10_net(net, tmp, extra={"classes": classes, "train_config": asdict(cfg),
                                          "test_acc": summary["test_acc"]})
        (tmp / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        write_json(tmp / "summary.json", summary)
    return summary
