"""Where a model is: the bundled model's folder, a local folder, or a hub id fetched to one. Without torch, so that
`gacq experiment list` and the GPU call scripts' spec listings check a cell's model digest without importing it;
`gacq.models` re-exports these names."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from .errors import GacqError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
BUNDLED_MODEL_NAME = "cifar10-small"


def bundled_model_path() -> Path:
    """Folder of the CIFAR-10 model shipped inside the package."""
    return Path(str(resources.files("gacq") / "assets" / BUNDLED_MODEL_NAME))


def _download(repo_id: str) -> Path:
    """Fetch the JSON and safetensors files of a hub repository (never pickles)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.md", "*.txt"])
        )
    except Exception as e:  # the hub client raises many types (offline, 404, auth)
        raise GacqError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Check the id and your network, or pass a local folder."
        ) from e


def resolve_model_folder(spec: str | os.PathLike | None) -> tuple[Path, str]:
    """Turn --model into a local folder: None -> bundled model, path -> itself, hub id -> download."""
    if spec is None:
        path = bundled_model_path()
        if not (path / "model_index.json").exists():
            raise GacqError(
                f"the bundled model is missing from {path}; reinstall gacq from a full checkout "
                "or pass --model"
            )
        return path, f"bundled:{BUNDLED_MODEL_NAME}"
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix in PICKLE_SUFFIXES:
                raise GacqError(
                    f"{path} is a pickle checkpoint; gacq never unpickles files. Pass a diffusers folder "
                    "with safetensors weights (see `save_pretrained(..., safe_serialization=True)`)."
                )
            raise GacqError(
                f"{path} is a file; --model wants a diffusers folder (config.json + "
                "*.safetensors, or a pipeline folder with model_index.json) or a hub id"
            )
        return path, str(path)
    text = str(spec)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _download(text), f"hub:{text}"
    raise GacqError(f"model path {path} does not exist (and is not a hub id of the form owner/name)")
