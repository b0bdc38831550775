"""Mixed precision by layer name (`QuantConfig.w8_layers`, `gacq.quant.api.w8_checkpoint`) on a tiny real UNet2DModel:
the chosen layers get 8-bit weights, rounded to nearest on their searched grid (checked against a naive per-channel
loop in float64), and deriving them from a finished checkpoint equals quantizing with them from scratch where no
reconstruction or activation calibration could tell the two apart."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from gacq.errors import GacqError
from gacq.models import LoadedModel, build_model, load_model, save_model
from gacq.quant.api import QuantConfig, quantize, quantize_to_dir, w8_checkpoint
from gacq.quant.calib_data import CalibDataConfig
from gacq.quant.checkpoint import unpack_int
from gacq.quant.wrap import quant_layers

SC = "up_blocks.*.resnets.*.conv_shortcut"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(build_model("tiny").eval(), tmp_path_factory.mktemp("w8") / "tiny")


@pytest.fixture(scope="module")
def fp(model_dir):
    return load_model(str(model_dir))


def _names(pattern: str, model) -> list[str]:
    import fnmatch

    return sorted(n for n, _ in quant_layers(model) if fnmatch.fnmatchcase(n, pattern))


def _naive_rtn_error(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> float:
    """Largest |w - dequant(round(w / s) + z)| over output channels, in float64, one channel at a time."""
    worst = 0.0
    for o in range(w.shape[0]):
        s, z = float(scale.flatten()[o]), float(zp.flatten()[o])
        for v in w[o].flatten().double().tolist():
            q = min(max(round(v / s) + z, 0), 2**bits - 1)
            worst = max(worst, abs(v - (q - z) * s))
    return worst


def test_quantize_gives_the_matched_layers_8_bit_weights_and_keeps_their_input_bits(fp):
    cfg = QuantConfig(method="rtn", wbits=4, abits=None, w8_layers=(SC,))
    q = quantize(fp, cfg)
    chosen = _names(SC, q)
    assert len(chosen) == 4  # the tiny UNet's up-block shortcuts
    for n, m in quant_layers(q):
        assert m.weight_quantizer.bits == (8 if n in chosen else 4), n
        assert m.act_quantizer is None  # A32 stays A32 for the 8-bit layers too (not the recipe's W8A8)
    assert cfg.to_json()["w8_layers"] == [SC] and "w8_layers" not in QuantConfig(method="rtn").to_json()


def test_w8_layers_errors(fp):
    with pytest.raises(GacqError, match="matches none of the"):
        quantize(fp, QuantConfig(method="rtn", wbits=4, abits=None, w8_layers=("no_such_layer*",)))
    with pytest.raises(GacqError, match="with --wbits 8"):
        QuantConfig(method="rtn", wbits=8, w8_layers=(SC,))
    with pytest.raises(GacqError, match="layer-name patterns"):
        QuantConfig(method="rtn", w8_layers=SC)


def test_w8_checkpoint_equals_quantizing_with_w8_layers_from_scratch(fp, tmp_path):
    """Round-to-nearest weights with float activations: nothing learned, nothing calibrated, so deriving the 8-bit
    layers from the 4-bit checkpoint must give the from-scratch checkpoint exactly; the other layers keep the base's
    integers, and the 8-bit layers' integers round the float weight to nearest (naive float64 loop)."""
    base, scratch, derived = tmp_path / "base", tmp_path / "scratch", tmp_path / "derived"
    quantize_to_dir(fp, QuantConfig(method="rtn", wbits=4, abits=None), base, progress=False)
    quantize_to_dir(fp, QuantConfig(method="rtn", wbits=4, abits=None, w8_layers=(SC,)), scratch, progress=False)
    meta = w8_checkpoint(base, derived, fp, (SC,))
    a, b, c = (load_file(str(d / "quantized.safetensors")) for d in (derived, scratch, base))
    assert sorted(a) == sorted(b) == sorted(c)
    chosen = set(meta["w8_from"]["layers"])
    assert meta["w8_from"]["checkpoint"] == "base" and len(chosen) == 4
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a[k], c[k]) == (k.rsplit(".", 1)[0] not in chosen), k
    layers = json.loads((derived / "quant_config.json").read_text())["layers"]
    assert {n for n, e in layers.items() if e["wbits"] == 8} == chosen
    assert json.loads((derived / "quant_config.json").read_text())["config"]["w8_layers"] == [SC]
    fw = dict(fp.model.named_modules())
    for n in chosen:
        w = fw[n].weight.detach()
        ints = unpack_int(a[f"{n}.qweight"], 8, w.numel()).view(w.shape).double()
        s, z = a[f"{n}.scale"].double(), a[f"{n}.zero_point"].double()
        got = ((ints - z) * s - w.double()).abs().max().item()
        assert got == pytest.approx(_naive_rtn_error(w, s, z, 8), abs=1e-6)
        assert got <= s.max().item() / 2 + 1e-6  # within half a step: rounded to nearest, nothing clipped
    # the derived checkpoint loads and runs; its 8-bit layers are closer to the float model than the 4-bit ones
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    with torch.no_grad():
        ref = fp.model(x, t).sample
        err = {d.name: (load_model(str(d)).model(x, t).sample - ref).pow(2).mean().item() for d in (base, derived)}
    assert err["derived"] < err["base"]


def test_w8_checkpoint_keeps_calibrated_input_grids_and_refuses_what_it_cannot_do(fp, tmp_path):
    from gacq.quant.calib_data import collect
    from gacq.sampling import SampleConfig

    calib = collect(fp, SampleConfig(steps=5), CalibDataConfig(selection="all", n_trajectories=4), progress=False)
    calib.save(tmp_path / "calib")
    base = tmp_path / "base"
    quantize_to_dir(fp, QuantConfig(method="rtn", wbits=4, abits=8, calib=CalibDataConfig(n_trajectories=4,
                                                                                          n_steps=3)),
                    base, tmp_path / "calib", progress=False)
    w8_checkpoint(base, tmp_path / "d", fp, (SC,))
    a, c = (load_file(str(d / "quantized.safetensors")) for d in (tmp_path / "d", base))
    for k in a:
        if k.endswith(("act_scale", "act_zero_point")):
            assert torch.equal(a[k], c[k]), k
    with pytest.raises(GacqError, match="already has 8-bit layers"):
        w8_checkpoint(tmp_path / "d", tmp_path / "e", fp, (SC,))
    with pytest.raises(GacqError, match="matches none of the"):
        w8_checkpoint(base, tmp_path / "e", fp, ("nothing.*",))
    with pytest.raises(GacqError, match="the float model has no layer"):  # another architecture's float model
        w8_checkpoint(base, tmp_path / "e", LoadedModel(build_model("tiny-dit").eval()), (SC,))
    assert not (tmp_path / "e").exists()  # nothing half-written


def test_cli_quantize_w8_layer_and_a_bad_pattern(model_dir, tmp_path):
    """`gacq quantize --w8-layer` through a subprocess: the checkpoint's matched layers are 8-bit; a pattern that
    matches nothing is a clean error naming the option, with no traceback and no output folder."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "gacq", "quantize", "--model", str(model_dir), "--method", "rtn", "--wbits", "4",
            "--abits", "32", "--device", "cpu"]
    r = subprocess.run(base + ["--w8-layer", SC, "--out", str(tmp_path / "q")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    meta = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    assert sorted(n for n, e in meta["layers"].items() if e["wbits"] == 8) == [
        f"up_blocks.{i}.resnets.{j}.conv_shortcut" for i in (0, 1) for j in (0, 1)]
    assert meta["config"]["w8_layers"] == [SC]
    bad = subprocess.run(base + ["--w8-layer", "up_blocks.9.*", "--out", str(tmp_path / "bad")], capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode != 0 and "--w8-layer 'up_blocks.9.*' matches none" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()
