import json
import pickle

import pytest
import torch

from gacq.errors import GacqError
from gacq.models import (
    NAMED_CONFIGS, build_model, bundled_model_path, count_parameters, load_model, save_model,
)


def test_named_config_sizes():
    assert 1_000 <= count_parameters(build_model("tiny")) <= 60_000
    assert count_parameters(build_model("small")) == 8_952_067
    # google/ddpm-cifar10-32 has exactly this many parameters (Ho et al.'s 35.7M model).
    assert count_parameters(build_model("ddpm-cifar10")) == 35_746_307
    with pytest.raises(GacqError, match="unknown model config"):
        build_model("huge")


def _out(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([10, 900])).sample


def test_pipeline_roundtrip_exact(tiny_model_dir):
    torch.manual_seed(0)
    ref = build_model("tiny").eval()
    loaded = load_model(tiny_model_dir)
    assert loaded.sample_shape == (3, 16, 16)
    assert loaded.scheduler_config["beta_schedule"] == "linear"
    torch.testing.assert_close(_out(loaded.model), _out(ref), rtol=0, atol=0)


def test_diffusers_pipeline_reads_our_folder(tiny_model_dir):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(tiny_model_dir, use_safetensors=True)
    torch.testing.assert_close(_out(pipe.unet.eval()), _out(load_model(tiny_model_dir).model), rtol=0, atol=0)


def test_model_folder_layout_and_fp16(tmp_path):
    torch.manual_seed(1)
    m = build_model("tiny").eval()
    m.save_pretrained(tmp_path / "plain", safe_serialization=True)
    torch.testing.assert_close(_out(load_model(tmp_path / "plain").model), _out(m), rtol=0, atol=0)
    save_model(m, tmp_path / "half", dtype=torch.float16)
    half = load_model(tmp_path / "half")
    assert next(half.model.parameters()).dtype == torch.float32  # upcast on load
    # fp16 storage rounds each weight to 11 significant bits (relative error <= 2^-11).
    torch.testing.assert_close(_out(half.model), _out(m), rtol=2e-2, atol=2e-3)


class _Boom:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickles_are_refused_never_loaded(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **{
        k: list(v) if isinstance(v, tuple) else v for k, v in NAMED_CONFIGS["tiny"].items()}}))
    marker = tmp_path / "was_unpickled"
    boom = _Boom()
    boom.marker = str(marker)
    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(boom))
    with pytest.raises(GacqError, match="never unpickles"):
        load_model(folder)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(pickle.dumps(boom))
    with pytest.raises(GacqError, match="never unpickles"):
        load_model(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("case", ["missing", "nojson", "badclass", "noweights"])
def test_bad_model_folders(tmp_path, case):
    d = tmp_path / "m"
    if case != "missing":
        d.mkdir()
    if case == "badclass":
        (d / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    if case == "noweights":
        (d / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    msg = {"missing": "does not exist", "nojson": "not a diffusers folder", "badclass": "AutoencoderKL",
           "noweights": "no .safetensors"}[case]
    with pytest.raises(GacqError, match=msg):
        load_model(d)


def test_bundled_model_ships_and_loads():
    path = bundled_model_path()
    assert (path / "model_index.json").exists(), "the bundled CIFAR-10 model must ship with the package"
    loaded = load_model()
    assert loaded.source.startswith("bundled:")
    assert loaded.sample_shape == (3, 32, 32)
    assert count_parameters(loaded.model) == count_parameters(build_model("small"))
    assert (path / "MODEL_CARD.md").exists()
