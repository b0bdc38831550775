"""Carry a trained model folder between GPU sessions in parts (the DiT-S of experiments/dit-cifar10.toml).

A device call's working tree is limited to 64 MiB, and so are the files one call returns. The checkout alone takes
most of the working tree, and a 35M-parameter model in float32 (141 MB) fits neither. So the model travels in
float16 (70 MB), cut into parts:

    python scripts/model_parts.py pack MODEL PARTS [--part-mib 15 | --carry]
        Rounds every float tensor of MODEL's *.safetensors to float16 and back, in place. After that, the folder
        holds the very model that arrives at the other end, and the experiments made here and there share one
        weights digest. Then it writes PARTS/model.tar.partNN (the folder with float16 weights) and PARTS/manifest.json
        (part count and sha256). --carry sizes the parts to travel into a device call beside this checkout (like
        scripts/data-parts.sh: 64 MiB less the tracked files less 1 MiB).
    python scripts/model_parts.py join PARTS MODEL
        Checks the parts against the manifest and unpacks them. Writes MODEL with float32 weights, byte for byte what
        pack left in place. It writes to a temporary folder and renames it, and refuses when MODEL already exists
        with other weights.
    python scripts/model_parts.py status PARTS
        Prints "k of n parts here" and exits 3 while parts are missing.

A tensor outside float16's range (|x| > 65504) is an error, not a silent inf.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
PREFIX = "model.tar.part"
F16_MAX = float(torch.finfo(torch.float16).max)


class PartsError(Exception):
    pass


def _metadata(path: Path) -> dict[str, str] | None:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _convert(path: Path, dtype: torch.dtype, out: Path) -> None:
    """Every float tensor of one safetensors file as `dtype` into `out` (same metadata; other tensors as they are)."""
    tensors = load_file(str(path))
    conv = {}
    for name, t in tensors.items():
        if t.is_floating_point():
            if dtype == torch.float16:
                big = t.abs().max().item() if t.numel() else 0.0
                if not big <= F16_MAX:  # also catches nan
                    raise PartsError(f"{path}: tensor {name} has |x| up to {big}, beyond float16's {F16_MAX:g}; "
                                     "this model cannot travel in float16")
            t = t.to(dtype)
        conv[name] = t.contiguous()
    save_file(conv, str(out), metadata=_metadata(path))


def round_in_place(model: Path) -> int:
    """Round MODEL's float tensors to float16 and back to float32 (written atomically per file); returns files done."""
    files = sorted(model.rglob("*.safetensors"))
    if not files:
        raise PartsError(f"{model} holds no *.safetensors files; pass a diffusers model folder")
    for f in files:
        with tempfile.TemporaryDirectory(dir=f.parent) as td:
            half = Path(td) / "half.safetensors"
            _convert(f, torch.float16, half)
            _convert(half, torch.float32, Path(td) / "full.safetensors")
            (Path(td) / "full.safetensors").replace(f)
    return len(files)


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def carry_part_bytes(repo: Path) -> int:
    """Bytes a part may take to travel in one device call beside the tracked files (64 MiB - tracked - 1 MiB)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout.split(b"\0")
    tracked = sum((repo / n.decode()).stat().st_size for n in names if n and (repo / n.decode()).is_file())
    free = 64 * 2**20 - tracked - 2**20
    if free < 2**20:
        raise PartsError(f"only {free} bytes free beside the {tracked}-byte checkout; parts cannot travel")
    return free


def pack(model: Path, parts: Path, part_bytes: int) -> dict:
    if not (model / "model_index.json").exists() and not (model / "config.json").exists():
        raise PartsError(f"{model} is not a diffusers model folder (no model_index.json or config.json)")
    round_in_place(model)
    parts.mkdir(parents=True, exist_ok=True)
    for old in parts.glob(PREFIX + "*"):
        old.unlink()
    (parts / MANIFEST).unlink(missing_ok=True)
    buf = io.BytesIO()
    with tempfile.TemporaryDirectory() as td, tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(p for p in model.rglob("*") if p.is_file()):
            rel = f.relative_to(model).as_posix()
            src = f
            if f.suffix == ".safetensors":
                src = Path(td) / "half.safetensors"
                _convert(f, torch.float16, src)
            tar.add(str(src), arcname=rel)
    data = buf.getvalue()
    n = 0
    for n, start in enumerate(range(0, len(data), part_bytes), 1):
        (parts / f"{PREFIX}{n - 1:02d}").write_bytes(data[start:start + part_bytes])
    manifest = {"parts": n, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "dtype": "float16", "source": str(model)}
    tmp = parts / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(parts / MANIFEST)
    return manifest


def status(parts: Path) -> tuple[int, int]:
    mf = parts / MANIFEST
    if not mf.exists():
        raise PartsError(f"no {MANIFEST} in {parts}: carry it with the first part")
    want = json.loads(mf.read_text())["parts"]
    have = sum((parts / f"{PREFIX}{i:02d}").exists() for i in range(want))
    return have, want


def join(parts: Path, model: Path) -> dict:
    have, want = status(parts)
    if have < want:
        raise PartsError(f"{have} of {want} parts in {parts}; carry the rest first")
    manifest = json.loads((parts / MANIFEST).read_text())
    files = [parts / f"{PREFIX}{i:02d}" for i in range(want)]
    if _sha256(files) != manifest["sha256"]:
        raise PartsError(f"the parts in {parts} do not match the manifest's sha256; fetch them again")
    data = b"".join(f.read_bytes() for f in files)
    model = model.resolve()
    model.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=model.parent, prefix=f".{model.name}."))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            tar.extractall(tmp, filter="data")  # no absolute paths, links out of the folder or devices
        for f in sorted(tmp.rglob("*.safetensors")):
            _convert(f, torch.float32, f.with_suffix(".full"))
            f.with_suffix(".full").replace(f)
        if model.exists():
            same = sorted(p.relative_to(model) for p in model.rglob("*.safetensors")) == \
                sorted(p.relative_to(tmp) for p in tmp.rglob("*.safetensors")) and all(
                (model / p.relative_to(tmp)).read_bytes() == p.read_bytes() for p in tmp.rglob("*.safetensors"))
            if not same:
                raise PartsError(f"{model} exists with other weights; move it away to unpack these parts")
            shutil.rmtree(tmp)
            return manifest
        tmp.replace(model)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("model", type=Path)
    p.add_argument("parts", type=Path)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--part-mib", type=float, default=15.0, help="part size in MiB (default 15: the 16 MiB file limit)")
    g.add_argument("--carry", action="store_true", help="parts that travel into a device call beside this checkout")
    j = sub.add_parser("join")
    j.add_argument("parts", type=Path)
    j.add_argument("model", type=Path)
    s = sub.add_parser("status")
    s.add_argument("parts", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "pack":
            size = carry_part_bytes(Path.cwd()) if args.carry else int(args.part_mib * 2**20)
            m = pack(args.model, args.parts, size)
            print(f"model parts: {m['parts']} of at most {size} bytes, {m['bytes']} bytes in all, in {args.parts}")
        elif args.cmd == "join":
            join(args.parts, args.model)
            print(f"model parts: joined into {args.model} (float32)")
        else:
            have, want = status(args.parts)
            print(f"model parts: {have} of {want} here" + ("" if have == want else "; carry the next one"))
            return 0 if have == want else 3
    except PartsError as e:
        print(f"model_parts: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
