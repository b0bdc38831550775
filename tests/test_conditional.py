"""Class-conditional models (UNet2DModel with a label embedding, DiT): labels, guidance, calibration,
quantization and sampling end to end on tiny real diffusers models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gacq.conditioning import guided_eps, is_class_conditional, null_label, num_classes, predict_eps, sample_labels
from gacq.errors import GacqError
from gacq.models import build_model, load_model, save_model
from gacq.quant.calib_data import CalibDataConfig, CalibrationSet, collect, select_from_all
from gacq.sampling import SampleConfig, sample_generators

from .conftest import gacq_here, write_images


def gacq(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gacq", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module", params=["tiny-cond", "tiny-dit"])
def cond_model_dir(request, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(request.param).eval()
    with torch.no_grad():  # DiT's adaLN-Zero starts at zero: perturb so that labels matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_model(model, tmp_path_factory.mktemp("m") / request.param)


def test_guidance_at_scale_one_is_the_conditional_prediction(cond_model_dir):
    m = load_model(cond_model_dir).model
    assert is_class_conditional(m) and num_classes(m) == 2 and null_label(m) == 2
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 3, 16, 16, generator=g), torch.tensor([3, 200, 600, 999])
    labels = torch.tensor([0, 1, 1, 0])
    fn = lambda a, b, c: predict_eps(m, a, b, c)  # noqa: E731
    cond = predict_eps(m, x, t, {"class_labels": labels})
    uncond = predict_eps(m, x, t, {"class_labels": torch.full_like(labels, 2)})
    # the batched [conditional; unconditional] path at scale 1 gives the conditional rows back
    c, u = {"class_labels": labels}, {"class_labels": torch.full_like(labels, 2)}
    torch.testing.assert_close(guided_eps(fn, x, t, c, u, 1.0, force=True), cond, atol=1e-5, rtol=0)
    # and at scale 3 the formula on the separately computed branches
    torch.testing.assert_close(guided_eps(fn, x, t, c, u, 3.0), uncond + 3 * (cond - uncond), atol=1e-5, rtol=1e-5)
    assert (cond - uncond).abs().max() > 1e-4  # the label is not ignored


def test_labels_balanced_fixed_and_refused():
    cond, uncond = build_model("tiny-cond"), build_model("tiny")
    assert sample_labels(cond, range(5), None).tolist() == [0, 1, 0, 1, 0]
    assert sample_labels(cond, range(3), 1).tolist() == [1, 1, 1]
    assert sample_labels(uncond, range(3), None) is None
    with pytest.raises(GacqError, match="out of range"):
        sample_labels(cond, range(3), 2)
    with pytest.raises(GacqError, match="class-conditional"):
        sample_labels(uncond, range(3), 0)
    with pytest.raises(GacqError, match="needs class labels"):
        predict_eps(cond, torch.zeros(1, 3, 16, 16), torch.tensor([1]))


def test_calibration_records_both_guidance_branches(cond_model_dir):
    loaded = load_model(cond_model_dir)
    scfg = SampleConfig(steps=6, guidance_scale=2.0)
    cs = collect(loaded, scfg, CalibDataConfig(selection="all", n_trajectories=3, batch_size=2), progress=False)
    assert len(cs) == 6 * 3 * 2
    lab = cs.cond["class_labels"].view(6, 3, 2)  # step, trajectory, branch
    assert (lab[:, :, 1] == 2).all() and lab[:, :, 0].tolist() == [[0, 1, 0]] * 6
    x = cs.x.view(6, 3, 2, 3, 16, 16)
    assert torch.equal(x[:, :, 0], x[:, :, 1])  # both branches see the same x_t
    # the first recorded input is the noise the sampler starts from
    first = torch.from_numpy(np.stack([x[0, i, 0].numpy() for i in range(3)]))
    noise = sample_generators(0, range(3))
    assert torch.allclose(first, torch.stack([torch.randn(3, 16, 16, generator=g) for g in noise]))
    # a uniform cut of the all-steps set equals collecting the uniform selection directly
    # (at the same trajectory batch size: CPU kernels may round differently for other batch sizes)
    ucfg = CalibDataConfig(selection="uniform", n_trajectories=3, n_steps=3, batch_size=2)
    direct = collect(loaded, scfg, ucfg, progress=False)
    cut = select_from_all(cs, ucfg)
    assert torch.equal(cut.x, direct.x) and torch.equal(cut.t, direct.t)
    assert torch.equal(cut.cond["class_labels"], direct.cond["class_labels"])


def test_calibration_set_keeps_labels_on_disk(tmp_path):
    cs = CalibrationSet(torch.randn(5, 3, 4, 4), torch.arange(5), torch.arange(5), {"a": 1},
                        {"class_labels": torch.tensor([0, 1, 2, 1, 0])})
    back = CalibrationSet.load(cs.save(tmp_path / "c", shard_size=2))
    assert torch.equal(back.cond["class_labels"], cs.cond["class_labels"]) and torch.equal(back.x, cs.x)
    sub = back.subset(torch.tensor([4, 1]))
    assert sub.cond["class_labels"].tolist() == [0, 1] and sub.t.tolist() == [4, 1]


# no separate tfmq case: gac's method spec is tfmq's with the learned sample weights added (gacq.quant.methods), so a
# gac run goes through every tfmq stage (TIB, per-step FSC ranges, block reconstruction), and test_methods pins gac
# with zero meta-iterations to tfmq
@pytest.mark.parametrize("method", ["qdiffusion", "gac"])
def test_quantize_and_sample_class_conditional(cond_model_dir, tmp_path, method):
    q, s = tmp_path / "q", tmp_path / "s"
    args = ["quantize", "--model", cond_model_dir, "--method", method, "--wbits", 4, "--abits", 8,
            "--guidance-scale", 2, "--steps", 6, "--record-steps", 5, "--calib-trajectories", 2, "--iters", 4,
            "--act-iters", 4, "--gac-meta-iters", 2, "--device", "cpu", "--out", q]
    r = gacq_here(*args)  # the CLI's entry point in this process; the checkpoint is loaded by a new interpreter below
    assert r.returncode == 0, r.stderr
    r = gacq("sample", "--model", q, "--guidance-scale", 2, "--steps", 6, "--num", 3, "--batch-size", 3,
             "--device", "cpu", "--out", s)
    assert r.returncode == 0, r.stderr
    z = np.load(s / "samples.npz")
    assert z["images"].shape == (3, 16, 16, 3) and z["labels"].tolist() == [0, 1, 0]
    # the quantized model really is quantized, and follows its labels
    qm = load_model(q).model
    fp = load_model(cond_model_dir).model
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    for lab in ([0, 1], [1, 0]):
        c = {"class_labels": torch.tensor(lab)}
        d = (predict_eps(qm, x, t, c) - predict_eps(fp, x, t, c)).abs().max()
        assert 0 < d < 1.0
    a = predict_eps(qm, x, t, {"class_labels": torch.tensor([0, 0])})
    b = predict_eps(qm, x, t, {"class_labels": torch.tensor([1, 1])})
    assert (a - b).abs().max() > 1e-4


def test_cli_refusals(tiny_model_dir, tmp_path):
    # refusals through the CLI's entry point in this process (gacq_here)
    r = gacq_here("sample", "--model", tiny_model_dir, "--class-label", 1, "--num", 2, "--out", tmp_path / "s")
    assert r.returncode == 2 and "needs a class-conditional model" in r.stderr and not (tmp_path / "s").exists()
    r = gacq_here("sample", "--model", tiny_model_dir, "--guidance-scale", 3, "--num", 2, "--out", tmp_path / "s")
    assert r.returncode == 2 and "needs a class-conditional or text-conditioned model" in r.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("config", ["tiny-cond", "tiny-dit"])
def test_train_class_conditional(tmp_path, config):
    data = write_images(tmp_path / "imgs", classes=("a", "b"), per_class=4)
    out = tmp_path / "run"
    r = gacq("train", "--data", data, "--config", config, "--out", out, "--max-steps", 3, "--batch-size", 4,
             "--grid-num", 2, "--grid-steps", 2, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    m = load_model(out / "model").model
    assert is_class_conditional(m) and type(m).__name__ == ("DiTTransformer2DModel" if "dit" in config else "UNet2DModel")
    three = write_images(tmp_path / "three", classes=("a", "b", "c"), per_class=2)
    r = gacq_here("train", "--data", three, "--config", config, "--out", tmp_path / "r3", "--max-steps", 1,
                  "--device", "cpu")  # a refusal: through the entry point in this process
    assert r.returncode == 2 and "has 2 classes" in r.stderr


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny text-conditioned UNet (cross-attention) and stored encoder states from a tiny random CLIP
    text encoder (transformers), as a user would precompute them."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("text")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, layers_per_block=1, norm_num_groups=4, attention_head_dim=2).eval()
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=8, bos_token_id=0,
                                       eos_token_id=1, pad_token_id=1)).eval()
    with torch.no_grad():
        states = enc(input_ids=torch.randint(2, 64, (3, 6))).last_hidden_state
        empty = enc(input_ids=torch.tensor([[0] + [1] * 5])).last_hidden_state
    save_file({"encoder_hidden_states": states.contiguous(), "negative_encoder_hidden_states": empty.contiguous()},
              str(root / "prompts.safetensors"))
    return save_model(unet, root / "unet"), root / "prompts.safetensors"


def test_text_conditioned_calibrate_quantize_sample(text_model, tmp_path):
    model_dir, prompts = text_model
    loaded = load_model(model_dir)
    cs = collect(loaded, SampleConfig(steps=4, guidance_scale=3.0, prompt_embeds=str(prompts)),
                 CalibDataConfig(selection="all", n_trajectories=4, batch_size=4), progress=False)
    e = cs.cond["encoder_hidden_states"].view(4, 4, 2, 6, 8)  # step, trajectory, branch
    from safetensors.torch import load_file

    stored = load_file(str(prompts))
    assert torch.equal(e[0, 3, 0], stored["encoder_hidden_states"][0])  # trajectory 3 uses prompt 3 mod 3
    assert torch.equal(e[2, 1, 1], stored["negative_encoder_hidden_states"][0])
    q, s = tmp_path / "q", tmp_path / "s"
    # the CLI's entry point in this process; the checkpoint is loaded by a new interpreter below
    r = gacq_here("quantize", "--model", model_dir, "--method", "qdiffusion", "--wbits", 4, "--abits", 8,
                  "--steps", 4, "--record-steps", 2, "--calib-trajectories", 2, "--iters", 3, "--act-iters", 3,
                  "--device", "cpu", "--prompt-embeds", prompts, "--guidance-scale", 3, "--out", q)
    assert r.returncode == 0, r.stderr
    r = gacq("sample", "--model", q, "--steps", 4, "--num", 3, "--prompt-embeds", prompts, "--guidance-scale", 3,
             "--device", "cpu", "--out", s)
    assert r.returncode == 0, r.stderr
    assert np.load(s / "samples.npz")["images"].shape == (3, 8, 8, 3)
    r = gacq_here("sample", "--model", q, "--steps", 4, "--num", 3, "--device", "cpu", "--out", tmp_path / "s2")
    assert r.returncode == 2 and "needs encoder states" in r.stderr


def test_dit_temporal_block_is_its_adaln_modulation_and_reconstructs():
    """On a DiT the TIB's features are what every block's adaLN-Zero modulation and proj_out_1
    compute inside a full forward (they depend on t and label only); TIAR lowers their error
    against round-to-nearest and freezes the layers, which block reconstruction then leaves out."""
    import copy

    from gacq.quant.recon import ReconConfig, find_units, trainable_layers
    from gacq.quant.tfmq import TIB, reconstruct_tib
    from gacq.quant.wrap import quant_layers, set_quant_state, wrap_layers

    torch.manual_seed(0)
    fp = build_model("tiny-dit").eval()
    with torch.no_grad():
        for p in fp.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tib = TIB(fp)
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, o, i=i: seen.setdefault(i, o.detach()))
             for i, m in enumerate([n.linear for n in tib.norms] + [fp.proj_out_1])]
    t, lab = torch.tensor([3, 500, 999]), torch.tensor([0, 1, 2])  # 2: the null label
    with torch.no_grad():
        fp(torch.randn(3, 3, 16, 16), t, class_labels=lab)
        for h in hooks:
            h.remove()
        feats = tib.forward(t, lab)
    assert len(feats) == len(seen) == 3  # two blocks' modulation + the output layer's shift/scale
    for i, a in enumerate(feats):
        torch.testing.assert_close(a, seen[i])
    with pytest.raises(GacqError, match="needs the samples' labels"):
        tib.forward(t)

    q = copy.deepcopy(fp)
    wrap_layers(q, 3, None)
    for _, m in quant_layers(q):
        m.init_weight("mse")
    set_quant_state(q, weights=True, acts=False)
    qt = TIB(q)
    assert len(qt.layers()) == 2 * 3 + 1
    g = torch.Generator().manual_seed(0)
    tc, lc = torch.randint(0, 1000, (64,), generator=g), torch.randint(0, 3, (64,), generator=g)
    with torch.no_grad():
        tgt = TIB(fp).forward(tc, lc)
        rtn = sum(float((o - y).pow(2).sum()) for o, y in zip(qt.forward(tc, lc), tgt))
    stats = reconstruct_tib(q, fp, tc, ReconConfig(iters=60, batch_size=16, lr=1e-2), progress=False, labels=lc)
    with torch.no_grad():
        after = sum(float((o - y).pow(2).sum()) for o, y in zip(qt.forward(tc, lc), tgt))
    assert after < rtn and stats["loss_after"] < stats["loss_before"]
    assert all(m.recon_frozen for m in qt.layers())
    frozen = {id(m) for m in qt.layers()}
    units = find_units(q)  # the transformer blocks stay units; none of their trainable layers is a TIB layer
    assert sum(type(u).__name__ == "BasicTransformerBlock" for _, u in units) == 2
    assert not any(id(m) in frozen for _, u in units for m in trainable_layers(u))
    assert "proj_out_1" not in dict(find_units(q))
    with pytest.raises(GacqError, match="implemented for UNet2DModel and DiTTransformer2DModel"):
        TIB(torch.nn.Linear(2, 2))
