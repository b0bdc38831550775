"""Metric numerics against independent references (scipy, naive loops), and the eval pipeline."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

from gacq.errors import GacqError
from gacq.metrics import (
    FeatureStats, StatsAccumulator, compute_stats, evaluate, frechet_distance, get_feature_extractor,
    inception_score, load_stats, precision_recall,
)
from gacq.metrics.cifar10_net import Cifar10Net, augment, load_cifar10_net, save_cifar10_net

from ..conftest import gacq_here


def _random_stats(rng, d, n=400):
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    return a.mean(0), np.atleast_2d(np.cov(a, rowvar=False))


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    for d in (1, 5, 32):
        mu1, s1 = _random_stats(rng, d)
        mu2, s2 = _random_stats(rng, d)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        got = frechet_distance(mu1, s1, mu2, s2)
        assert got == pytest.approx(ref, rel=1e-7, abs=1e-9)
        assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-9)
        assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8


def test_frechet_distance_rank_deficient_and_bad_input():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 20))  # 5 samples in 20 dims: singular covariance
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    # zero eigenvalues come out as +-1e-16, whose square roots are 1e-8: the error floor of a singular case
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-5
    with pytest.raises(GacqError, match="NaN"):
        frechet_distance(mu, s * np.nan, mu, s)
    with pytest.raises(GacqError, match="dimensions differ"):
        frechet_distance(mu[:3], s[:3, :3], mu, s)


def _naive_pr(real, fake, k):
    def radii(a):
        return np.array([sorted(np.linalg.norm(a - p, axis=1))[k] for p in a])

    rr, rf = radii(real), radii(fake)
    prec = np.mean([any(np.linalg.norm(f - r) <= rr[j] for j, r in enumerate(real)) for f in fake])
    rec = np.mean([any(np.linalg.norm(r - f) <= rf[j] for j, f in enumerate(fake)) for r in real])
    return prec, rec


def test_precision_recall_matches_naive_loop():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(60, 4))
    fake = rng.normal(size=(45, 4)) * 1.5 + 0.5
    p, r = precision_recall(real, fake, k=3, chunk=7)
    pr, rr = _naive_pr(real, fake, 3)
    assert (p, r) == (pytest.approx(pr, abs=1e-12), pytest.approx(rr, abs=1e-12))
    assert 0 < p < 1 and 0 < r <= 1
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    with pytest.raises(GacqError, match="more than 3"):
        precision_recall(real[:3], fake, k=3)


def test_reference_radii_cache_returns_the_computed_radii_and_keys_on_the_features(tmp_path, monkeypatch):
    """The reference's k-NN radii are cached in the process and on disk (GACQ_CACHE_DIR): a hit gives the radii
    computed without the cache, bitwise; another reference (one value changed) or k gets its own entry; a damaged
    cache file is recomputed; GACQ_CACHE_DIR=off writes nothing. And precision/recall against the naive loop with a
    reference big enough to be cached."""
    pr_mod = sys.modules["gacq.metrics.precision_recall"]
    monkeypatch.setenv("GACQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(pr_mod, "_MEMO", {})
    rng = np.random.default_rng(5)
    real = torch.as_tensor(rng.normal(size=(pr_mod.CACHE_MIN + 17, 6)), dtype=torch.float64)
    fresh = pr_mod._kth_radius(real, 3, 250)
    assert torch.equal(pr_mod.reference_radii(real, 3, 250), fresh)
    files = list((tmp_path / "cache/pr-radii").glob("*.npy"))
    assert len(files) == 1 and np.array_equal(np.load(files[0]), fresh.numpy())
    pr_mod._MEMO.clear()
    files[0].write_bytes(np.save.__doc__.encode()[:100])  # damaged: not an .npy file
    assert torch.equal(pr_mod.reference_radii(real, 3, 250), fresh)
    pr_mod._MEMO.clear()
    assert np.array_equal(np.load(files[0]), fresh.numpy())  # rewritten whole
    assert torch.equal(pr_mod.reference_radii(real, 3, 250), fresh)  # read back from disk
    other = real.clone()
    other[5, 2] += 1.0
    assert torch.equal(pr_mod.reference_radii(other, 3, 250), pr_mod._kth_radius(other, 3, 250))
    assert torch.equal(pr_mod.reference_radii(real, 4, 250), pr_mod._kth_radius(real, 4, 250))
    assert len(list((tmp_path / "cache/pr-radii").glob("*.npy"))) == 3
    monkeypatch.setenv("GACQ_CACHE_DIR", "off")
    pr_mod._MEMO.clear()
    assert pr_mod.cache_dir() is None and torch.equal(pr_mod.reference_radii(other * 2, 3, 250),
                                                       pr_mod._kth_radius(other * 2, 3, 250))
    assert len(list((tmp_path / "cache/pr-radii").glob("*.npy"))) == 3
    monkeypatch.setenv("GACQ_CACHE_DIR", str(tmp_path / "cache"))
    fake = rng.normal(size=(40, 6)) * 1.3
    got = precision_recall(real.numpy(), fake, k=3)
    assert got == precision_recall(real.numpy(), fake, k=3)  # the second from the cache
    want = _naive_pr(real.numpy(), fake, 3)
    assert got == (pytest.approx(want[0], abs=1e-12), pytest.approx(want[1], abs=1e-12))


def test_inception_score_limits():
    n, c = 200, 10
    assert inception_score(np.zeros((n, c)))[0] == pytest.approx(1.0, abs=1e-12)
    confident = np.full((n, c), -1e4)
    confident[np.arange(n), (np.arange(n) // 10) % c] = 0.0  # each split gets every class equally often
    mean, std = inception_score(confident, splits=10)
    assert mean == pytest.approx(c, rel=1e-9) and std < 1e-9


def test_inception_score_matches_direct_kl():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(100, 7)) * 3
    mean, _ = inception_score(logits, splits=4)
    scores = []
    for s in range(4):
        lp = torch.log_softmax(torch.tensor(logits[s::4]), 1).numpy()
        p = np.exp(lp)
        q = p.mean(0)
        scores.append(np.exp(np.mean([(p[i] * (lp[i] - np.log(q))).sum() for i in range(len(p))])))
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)


def test_stats_accumulator_matches_numpy_and_roundtrips(tmp_path):
    rng = np.random.default_rng(4)
    pool = rng.normal(size=(103, 6)) + 1e3  # a large offset: the shifted accumulation must not cancel
    spatial = rng.normal(size=(103, 4))
    logits = rng.normal(size=(103, 3))
    acc = StatsAccumulator("cifar10", "abc", pr_max=50, is_splits=5, seed=0)
    for i in range(0, 103, 17):
        acc.add({"pool": pool[i:i + 17], "spatial": spatial[i:i + 17], "logits": logits[i:i + 17]})
    st = acc.result({"source": "test"})
    np.testing.assert_allclose(st.mu, pool.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.sigma, np.cov(pool, rowvar=False), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(st.sigma_spatial, np.cov(spatial, rowvar=False), rtol=1e-8, atol=1e-12)
    assert st.inception_score()[0] == pytest.approx(inception_score(logits, splits=5)[0], rel=1e-10)
    # the reservoir holds 50 distinct input rows
    assert st.pr_features.shape == (50, 6)
    rows = {tuple(np.float32(r)) for r in pool}
    assert all(tuple(r) in rows for r in st.pr_features)
    assert len({tuple(r) for r in st.pr_features}) == 50
    st.save(tmp_path / "s.npz")
    back = load_stats(tmp_path / "s.npz")
    assert (back.feature_name, back.feature_hash, back.n) == ("cifar10", "abc", 103)
    np.testing.assert_allclose(back.sigma, st.sigma, rtol=1e-6)
    assert back.meta["source"] == "test"
    with pytest.raises(GacqError, match="NaN"):
        acc.add({"pool": pool[:2] * np.nan, "spatial": spatial[:2], "logits": logits[:2]})


def _stats_of(pool, spatial, logits, pr_max, splits=5):
    acc = StatsAccumulator("cifar10", "abc", pr_max=pr_max, is_splits=splits, seed=0)
    for i in range(0, len(pool), 7):
        acc.add({"pool": pool[i:i + 7], "spatial": spatial[i:i + 7], "logits": logits[i:i + 7]})
    return acc.result({"source": "test"})


def test_stats_merged_from_parts_equal_one_pass(tmp_path):
    """A run's statistics made in parts (`part_stats`, saved and loaded, then `merge_stats`) against numpy on all of
    its features: moments to float rounding (the parts' covariances stored as float32: 1e-6), the Inception Score's
    split sums exactly those of one pass, precision/recall's features exactly the run's `pr_rows`."""
    from gacq.metrics.stats import merge_stats, part_stats, pr_rows

    rng = np.random.default_rng(5)
    n = 120
    pool = rng.normal(size=(n, 6)) * rng.uniform(0.5, 3, 6) + 1e2
    spatial, logits = rng.normal(size=(n, 4)), rng.normal(size=(n, 3)) * 3
    bounds = [0, 35, 80, 120]  # parts of 35, 45 and 40 images, each starting at a multiple of the 5 splits
    parts = []
    for k, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        part = part_stats(_stats_of(pool[lo:hi], spatial[lo:hi], logits[lo:hi], pr_max=hi - lo), lo, n, pr_max=50,
                          seed=3)
        part.save(tmp_path / f"p{k}.npz")
        parts.append(load_stats(tmp_path / f"p{k}.npz"))
    merged = merge_stats(parts[::-1], source="three parts")  # in any order
    one = _stats_of(pool, spatial, logits, pr_max=n)
    assert merged.n == n and merged.meta["source"] == "three parts"
    np.testing.assert_allclose(merged.mu, pool.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.sigma, np.cov(pool, rowvar=False), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(merged.mu_spatial, spatial.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(merged.sigma_spatial, np.cov(spatial, rowvar=False), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(merged.is_p_sum, one.is_p_sum, rtol=1e-12)
    np.testing.assert_array_equal(merged.is_count, one.is_count)
    assert merged.inception_score()[0] == pytest.approx(one.inception_score()[0], rel=1e-10)
    rows = pr_rows(n, 50, 3)
    assert len(rows) == 50 == len(set(rows.tolist()))
    np.testing.assert_array_equal(merged.pr_features, pool[rows].astype(np.float16).astype(np.float32))
    # a run of at most pr_max images keeps every image's features, as one pass does
    small = merge_stats([part_stats(_stats_of(pool[lo:hi], spatial[lo:hi], logits[lo:hi], hi - lo), lo, n, pr_max=n)
                         for lo, hi in itertools.pairwise(bounds)])
    np.testing.assert_array_equal(small.pr_features, one.pr_features)
    # parts that do not tile the run, or come from other runs, are refused
    with pytest.raises(GacqError, match="missing"):
        merge_stats(parts[:2])
    with pytest.raises(GacqError, match="expected"):
        merge_stats([parts[0], parts[2]])
    with pytest.raises(GacqError, match="different runs"):
        merge_stats([parts[0], part_stats(_stats_of(pool[35:], spatial[35:], logits[35:], 85), 35, n, 50, seed=4)])
    with pytest.raises(GacqError, match="multiple"):
        part_stats(_stats_of(pool[:33], spatial[:33], logits[:33], 33), 33, n)
    with pytest.raises(GacqError, match="every image"):
        part_stats(_stats_of(pool[:35], spatial[:35], logits[:35], 10), 0, n)


def test_pr_rows_are_uniform():
    hits = np.zeros(100)
    from gacq.metrics.stats import pr_rows

    for seed in range(300):
        hits[pr_rows(100, 10, seed)] += 1
    assert hits[:50].mean() == pytest.approx(30, rel=0.15) and hits[50:].mean() == pytest.approx(30, rel=0.15)


def test_reservoir_is_uniform():
    # every index should land in a 10-of-100 reservoir with probability 0.1
    hits = np.zeros(100)
    for seed in range(300):
        acc = StatsAccumulator("x", "h", pr_max=10, is_splits=1, seed=seed)
        f = np.arange(100, dtype=np.float64)[:, None].repeat(2, 1)
        acc.add({"pool": f, "spatial": f, "logits": f})
        hits[acc.reservoir[:, 0].astype(int)] += 1
    assert hits[:10].mean() == pytest.approx(30, rel=0.25) and hits[90:].mean() == pytest.approx(30, rel=0.25)


def test_classifier_roundtrip_and_flip_invariance(tmp_path):
    torch.manual_seed(0)
    net = Cifar10Net((8, 8, 16, 16)).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
    save_cifar10_net(net, tmp_path)
    back = load_cifar10_net(tmp_path)
    x = torch.rand(3, 3, 32, 32)
    a, b = net.features(x), back.features(x)
    assert set(a) == {"pool", "spatial", "logits"} and a["spatial"].shape == (3, 8 * 8 * 8)
    for k in a:  # fp16 storage
        torch.testing.assert_close(a[k], b[k], atol=2e-2, rtol=2e-2)
    f = back.features(x.flip(3))
    torch.testing.assert_close(f["pool"], b["pool"], atol=1e-5, rtol=1e-5)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vgg"}))
    with pytest.raises(GacqError, match="unknown architecture"):
        load_cifar10_net(tmp_path)


def test_augment_crops_flips_and_cuts():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) % 251
    y = augment(x.to(torch.uint8), g, pad=0, cutout=0)
    for i in range(2):
        assert torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(2))
    z = augment(torch.full((4, 3, 8, 8), 255, dtype=torch.uint8), g, pad=2, cutout=4)
    assert (z < 255).any() and (z == 255).float().mean() > 0.6


def test_bundled_feature_network_and_stats_agree():
    ext = get_feature_extractor("cifar10", "cpu")
    from gacq.metrics import bundled_stats_path

    for split in ("train", "test"):
        st = load_stats(bundled_stats_path(split))
        assert (st.feature_name, st.feature_hash) == ("cifar10", ext.hash)
        assert st.n == {"train": 50000, "test": 10000}[split]
        assert st.pr_features.shape == (10000, 384)
    tr, te = load_stats(bundled_stats_path("train")), load_stats(bundled_stats_path("test"))
    assert frechet_distance(tr.mu, tr.sigma, te.mu, te.sigma) < 5  # train vs test: the metric's floor


def _imgs(n, size=32, seed=0, ch=3):
    return (np.random.default_rng(seed).random((n, size, size, ch)) * 255).astype(np.uint8)


def test_evaluate_inputs_and_errors(tmp_path):
    ext = get_feature_extractor("cifar10", "cpu")
    a = compute_stats(_imgs(40, seed=0), ext, batch_size=16, progress=False)
    assert isinstance(a, FeatureStats) and a.n == 40
    res = evaluate(_imgs(40, seed=1), a, device="cpu", batch_size=16, pr_max=40, is_splits=10, progress=False)
    assert res["feature_network"]["name"] == "cifar10" and res["fid_biased"] and res["warnings"]
    assert res["fid"] > 0 and 0 <= res["precision"] <= 1
    with pytest.raises(GacqError, match="RGB"):
        evaluate(_imgs(20, ch=1), a, device="cpu", progress=False)
    with pytest.raises(GacqError, match="32x32"):
        evaluate(_imgs(20, size=16), a, device="cpu", progress=False)
    with pytest.raises(GacqError, match="too few"):
        evaluate(_imgs(1), a, device="cpu", progress=False)
    other = FeatureStats(**{**a.__dict__, "feature_hash": "0000"})
    with pytest.raises(GacqError, match="recompute"):
        evaluate(_imgs(20), other, device="cpu", progress=False)
    with pytest.raises(GacqError, match="unknown feature network"):
        evaluate(_imgs(20), a, features="vgg", device="cpu")
    with pytest.raises(GacqError, match="--inception-weights"):
        evaluate(_imgs(20), a, features="inception", device="cpu")
    (tmp_path / "text.npz").write_text("not an archive")  # np.load would try it as a pickle
    with pytest.raises(GacqError, match="statistics file .*text.npz: not an .npz archive"):
        load_stats(tmp_path / "text.npz")


def test_evaluate_with_inception_random_weights(tmp_path):
    from safetensors.torch import save_file

    from gacq.metrics.inception import FIDInceptionV3

    torch.manual_seed(0)
    net = FIDInceptionV3()
    w = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(w))
    res = evaluate(_imgs(12, size=16, seed=1), _imgs(12, size=24, seed=2), features="inception",
                   inception_weights=w, device="cpu", batch_size=6, pr_max=12, progress=False)
    assert res["feature_network"]["name"] == "inception" and np.isfinite(res["fid"]) and np.isfinite(res["sfid"])


def test_cli_stats_and_eval(tmp_path):
    np.savez(tmp_path / "ref.npz", images=_imgs(30, seed=0))
    np.savez(tmp_path / "samples.npz", images=_imgs(30, seed=5))
    cmd = [sys.executable, "-m", "gacq"]
    # `gacq stats` through the CLI's entry point in this process, `gacq eval` in a new interpreter
    r = gacq_here("stats", "--data", tmp_path / "ref.npz", "--out", tmp_path / "ref_stats.npz", "--device", "cpu",
                  "--pr-max", "30")
    assert r.returncode == 0, r.stderr
    r = subprocess.run(cmd + ["eval", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref_stats.npz"),
                              "--json", str(tmp_path / "m.json"), "--device", "cpu", "--pr-max", "30"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "feature network: cifar10" in r.stdout and "biased" in r.stdout
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["samples"]["n"] == 30 and m["reference"]["n"] == 30 and m["command"].startswith("gacq eval")
    r = gacq_here("eval", "--samples", tmp_path / "nope.npz", "--device", "cpu")  # a refusal: in this process
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_cli_stats_in_parts_and_merged_equal_one_pass(tmp_path):
    """`gacq stats --part-of FIRST:TOTAL` on each part's images, then `--merge`: the same FID against a reference as
    the statistics of all the images in one pass (the parts' covariances stored in float32), and every feature kept
    where the run has at most --pr-max images. Refusals: neither or both of --data / --merge, a bad --part-of."""
    imgs = _imgs(40, seed=3)
    ref = compute_stats(_imgs(30, seed=0), get_feature_extractor("cifar10", "cpu"), progress=False)
    for k, (lo, hi) in enumerate([(0, 20), (20, 40)]):
        np.savez(tmp_path / f"p{k}.npz", images=imgs[lo:hi])
        r = gacq_here("stats", "--data", tmp_path / f"p{k}.npz", "--out", tmp_path / f"s{k}.npz", "--part-of",
                      f"{lo}:40", "--device", "cpu")
        assert r.returncode == 0, r.stderr
    r = gacq_here("stats", "--merge", tmp_path / "s1.npz", "--merge", tmp_path / "s0.npz", "--out", tmp_path / "all.npz")
    assert r.returncode == 0 and "40 images" in r.stdout, r.stderr
    merged = load_stats(tmp_path / "all.npz")
    one = compute_stats(imgs, get_feature_extractor("cifar10", "cpu"), progress=False)
    assert frechet_distance(merged.mu, merged.sigma, ref.mu, ref.sigma) == pytest.approx(
        frechet_distance(one.mu, one.sigma, ref.mu, ref.sigma), rel=1e-5)
    np.testing.assert_allclose(merged.pr_features, one.pr_features, rtol=1e-3, atol=1e-3)  # float16 on disk
    r = gacq_here("stats", "--out", tmp_path / "x.npz")
    assert r.returncode == 2 and "--data" in r.stderr and "Traceback" not in r.stderr
    r = gacq_here("stats", "--data", tmp_path / "p0.npz", "--out", tmp_path / "x.npz", "--part-of", "3")
    assert r.returncode == 2 and "FIRST:TOTAL" in r.stderr
    r = gacq_here("stats", "--data", tmp_path / "p0.npz", "--out", tmp_path / "x.npz", "--part-of", "5:40")
    assert r.returncode == 2 and "multiple of the 10" in r.stderr
