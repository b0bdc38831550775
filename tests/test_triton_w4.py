"""The w4a16 Triton kernel (gacq.export.triton_w4) in Triton's CPU interpreter, against float64
references; each case runs tests/triton_w4_checks.py in a subprocess with TRITON_INTERPRET=1
(it must be set before triton is imported, so not in this process)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHECKS = Path(__file__).with_name("triton_w4_checks.py")

# triton has Linux wheels only; the test extras install it there (pyproject), so on Linux a
# missing triton fails these tests instead of skipping them
pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="triton is only installed on Linux")


CASES = ["matmul_fp32", "matmul_fp16", "conv", "layers", "int8_conv", "w4a8", "split_k", "halo", "kmajor", "int8_token",
         "fake_quant", "fake_quant_token", "compiled_ops", "fp8_conv", "fp8_codes_sweep", "fp8_linear"]


# Two interpreter processes, balanced by their measured CPU time (session 51: about 170 and 160 s here; each case
# prints its own CPU seconds on stderr)
GROUPS = [["halo", "fp8_conv", "split_k", "compiled_ops", "int8_conv", "int8_token", "matmul_fp32", "matmul_fp16",
           "layers"],
          ["fp8_linear", "kmajor", "fp8_codes_sweep", "w4a8", "conv", "fake_quant_token", "fake_quant"]]
assert sorted(c for group in GROUPS for c in group) == sorted(CASES)
SWEEP = CHECKS.parent.parent / "benchmarks" / "tune_conv_tiles.py"


class Job:
    """A subprocess started at once, its output in files (pipes nobody reads could fill and block it)."""

    def __init__(self, args: list[str], env: dict, workdir: Path, timeout: float = 600, nice: int = 0):
        workdir.mkdir(parents=True, exist_ok=True)
        self.out, self.err, self.timeout = workdir / "stdout", workdir / "stderr", timeout
        self.report: Path | None = None  # where a job writes its report, for the test that reads it
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.proc = subprocess.Popen(args, stdout=o, stderr=e, text=True, env=env, cwd=CHECKS.parent.parent,
                                         preexec_fn=(lambda: os.nice(nice)) if nice else None)

    def result(self) -> subprocess.CompletedProcess:
        try:
            rc = self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        return subprocess.CompletedProcess(self.proc.args, rc, self.out.read_text(), self.err.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_interpreter_jobs(root: Path, nice: int = 0) -> dict[str, Job]:
    """Every single-threaded interpreter run of this file, started together so they share the machine's cores:
    the checks in two processes (torch and triton imported once each; every case starts from a new process's
    generator state and a failing case does not stop the others), and the smoke grid's tile sweeps: every kernel at
    its batch of 2, int8 and FP8 at batch 1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    # a hang guard, not a speed bound: under `pytest -n 2` the jobs start with this file, first, and share the two
    # cores with the other worker's tests; checks0 (228 s of CPU alone) needed more than 600 s there in session 47
    timeout = 1800
    jobs = {f"checks{i}": Job([sys.executable, str(CHECKS), *group], env, root / f"checks{i}", timeout, nice)
            for i, group in enumerate(GROUPS)}
    # at batch 1 (the small-M case) int8 (halo and masked paths) and FP8 (its own quantize kernel and tile rules)
    # only: W4A8 is int8's conv kernel on packed weights, W4A16 and the FP8 GEMM alone run at batch 2 in the sweep
    # above, and the batch-1 sweep of every kernel took 132 s of CPU against 56 s so (session 48)
    for name, extra in (("sweep", []), ("sweep_batch1", ["--batch", "1", "--kernels", "int8,fp8"])):
        jobs[name] = Job([sys.executable, str(SWEEP), "--out", str(root / name / "report"), "--grid", "smoke", *extra],
                         env, root / name, timeout, nice)
        jobs[name].report = root / name / "report"
    return jobs


# Started by conftest's pytest_collection_finish when a test of this file is selected (Linux only). Started by the
# fixture, the jobs held the first test here for 190-250 s on the 2-core CI machine, while the rest of the suite
# leaves about a third of the cores idle (136% CPU over 23.6 min); at nice 19 from the start they run in those gaps
# (the same suite: 20.7 min, 164% CPU; session 41).
EARLY: dict[str, Job] = {}


def start_early(root: Path) -> None:
    if platform.system() == "Linux" and not EARLY:
        EARLY.update(start_interpreter_jobs(root, nice=19))


def stop_early() -> None:
    for job in EARLY.values():
        job.stop()


@pytest.fixture(scope="module")
def interpreter_jobs(tmp_path_factory) -> dict[str, Job]:
    """The interpreter jobs: those conftest started at collection, else started now."""
    jobs = EARLY or start_interpreter_jobs(tmp_path_factory.mktemp("interpreter"))
    yield jobs
    for job in jobs.values():
        job.stop()


@pytest.mark.parametrize("case", CASES)
def test_w4a16_kernel_in_the_interpreter(interpreter_jobs, case):
    r = interpreter_jobs[f"checks{next(i for i, g in enumerate(GROUPS) if case in g)}"].result()
    report = r.stdout.split(f"FAILED {case}\n", 1)[-1][:4000] if f"FAILED {case}\n" in r.stdout else r.stdout[-2000:]
    assert f"ok {case}\n" in r.stdout, report + r.stderr[-4000:]
    assert r.returncode == 0 or "FAILED" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]  # no crash past the cases


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES)
def test_w4a16_kernel_on_cuda(case):
    """The same checks, compiled for the GPU (fp32 products must stay IEEE, not TF32)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(CHECKS), case], capture_output=True, text=True,
                       env={**env, "GACQ_TRITON_DEVICE": "cuda"}, timeout=600, cwd=CHECKS.parent.parent)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert f"ok {case}" in r.stdout


def test_tile_sweep_runs_in_the_interpreter(interpreter_jobs):
    """benchmarks/tune_conv_tiles.py's smoke grid: every kernel runs through the sweep's code path and the report is
    written (speed itself is only measured on the GPU)."""
    job = interpreter_jobs["sweep"]
    r, report = job.result(), job.report
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((report / "conv_tiles.json").read_text())["rows"]
    summaries = [x["summary"] for x in rows if "summary" in x]
    # --halo both (the default): int8 and W4A8 through the halo path and the masked path, side by side
    assert [(s["kernel"], s["halo"]) for s in summaries] == [("int8", True), ("int8", False), ("w4a8", True),
                                                            ("w4a8", False), ("w4a16", None), ("fp8", True),
                                                            ("fp8-gemm", True)]
    assert all(s["best_matches_default"] for s in summaries)
    assert summaries[0]["general_taps_equal"]  # int8: the per-element tap path gives the aligned path's integers
    assert summaries[1]["same_as_halo"] and summaries[3]["same_as_halo"]  # the same integers both ways
    assert all(set(summaries[i]["halo_vs_masked"]) == {"default", "best"} for i in (0, 2))
    assert "| int8 | on |" in (report / "conv_tiles.md").read_text()
    configs = [x for x in rows if "summary" not in x]
    assert len(configs) == 14 and all(x.get("matches_default") for x in configs), configs  # the 16-row tile too


def test_tile_sweep_at_batch_one(interpreter_jobs, tmp_path):
    """--batch 1 (the small-M case), int8 and FP8 kernels: a 16-row tile over a single image gives the default
    tiles' output, and the report says the batch; a bad --batch is refused before anything runs."""
    job = interpreter_jobs["sweep_batch1"]
    r, report = job.result(), job.report
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((report / "conv_tiles.json").read_text())["rows"]
    summaries = [(x["summary"]["kernel"], x["summary"]["halo"]) for x in rows if "summary" in x]
    assert summaries == [("int8", True), ("int8", False), ("fp8", True)]
    configs = [x for x in rows if "summary" not in x]
    assert len(configs) == 6 and all(x.get("matches_default") for x in configs), configs
    assert "tile sweep at batch 1" in (report / "conv_tiles.md").read_text()
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([sys.executable, str(SWEEP), "--out", str(tmp_path / "bad"), "--grid", "smoke", "--batch",
                          "0"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "--batch must be at least 1" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_int_mm_probe_needs_a_gpu(tmp_path):
    script = CHECKS.parent.parent / "benchmarks" / "probe_int_mm.py"
    r = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    if torch.cuda.is_available():
        assert r.returncode == 0 and (tmp_path / "int_mm_probe.md").exists()
    else:
        assert r.returncode != 0 and "needs a CUDA GPU" in r.stderr
        assert not (tmp_path / "int_mm_probe.json").exists()


def test_tiles_follow_the_measured_sweep(monkeypatch):
    """The GPU tile rule (results/conv_tiles): int8 convs (256, 128, 64) x 8 warps from 8,192 rows when the
    channels split into whole K blocks, int4-weight convs (256, 128, 64) x 8 warps from 65,536 rows, the generic
    rule elsewhere, FP8 convs their own sweep's tiles; every tile is 32 in the interpreter."""
    from gacq.export import triton_w4

    monkeypatch.setattr(triton_w4, "INTERPRET", True)
    assert triton_w4.tiles(10**6, 256, "int8", 256) == (32, 32, 32, 4)
    monkeypatch.setattr(triton_w4, "INTERPRET", False)
    assert triton_w4.tiles(262144, 128, "int8", 128) == (256, 128, 64, 8)
    assert triton_w4.tiles(16384, 256, "int8", 192) == (256, 128, 64, 8)
    assert triton_w4.tiles(16384, 256, "int8", 96) == (128, 128, 64, 8)  # 96 channels: not whole 64-blocks
    assert triton_w4.tiles(262144, 128, "w4", 128) == (256, 128, 64, 8)
    assert triton_w4.tiles(16384, 256, "w4", 256) == (128, 128, 64, 8)
    assert triton_w4.tiles(2000, 64) == (64, 64, 64, 4) and triton_w4.tiles(2000, 300) == (64, 128, 64, 4)
    # FP8 (session 34's H100 sweep): 4 warps on 128-square tiles, 128 x 256 with 8 where O >= 256 and C >= 512; the
    # int8 rule where the channels do not split into whole 128-blocks, and for few rows
    assert triton_w4.tiles(262144, 128, "fp8", 128) == (128, 128, 128, 4)
    assert triton_w4.tiles(65536, 256, "fp8", 256) == (128, 128, 128, 4)
    assert triton_w4.tiles(65536, 256, "fp8", 512) == (128, 256, 128, 8)
    assert triton_w4.tiles(16384, 256, "fp8", 192) == triton_w4.tiles(16384, 256, "int8", 192)
    assert triton_w4.tiles(1024, 256, "int8", 256) == (16, 64, 64, 4)
    # FP8 at batch 1 (session 35's H100 sweep): 64 x 64 x 128 from 512 rows, 16 x 64 x 128 for C >= 512, else 32 x 64
    assert triton_w4.tiles(1024, 128, "fp8", 128) == (64, 64, 128, 4)
    assert triton_w4.tiles(1024, 128, "fp8", 96) == (64, 64, 64, 4)  # 96 channels: no whole 128-blocks
    assert triton_w4.tiles(256, 256, "fp8", 512) == (16, 64, 128, 4)
    assert triton_w4.tiles(256, 256, "fp8", 256) == triton_w4.tiles(64, 256, "fp8", 256) == (32, 64, 64, 4)
    assert triton_w4.set_tile_rule("no-small-m") == "small-m"  # the batch-256 rule down to the smallest outputs
    try:
        assert triton_w4.tiles(1000, 64) == (64, 64, 64, 4) and triton_w4.tiles(100, 300) == (32, 64, 64, 4)
    finally:
        triton_w4.set_tile_rule("small-m")


def test_small_m_tile_rule(monkeypatch):
    """The default "small-m" rule gives outputs of at most SMALL_M rows the batch-1 sweep's tiles (int8 16 x 64,
    int4 weights and the generic GEMM 32 x 32, 4 warps) and larger outputs the batch-256 rule, which
    `set_tile_rule("no-small-m")` applies everywhere; an unknown rule is refused with the choices named, and the
    rule in force stays."""
    from gacq.export import triton_w4

    monkeypatch.setattr(triton_w4, "INTERPRET", False)
    assert triton_w4.SMALL_M == 1024
    small = {(m, kind): triton_w4.tiles(m, 256, kind, 256) for m in (64, 1024, 1025, 16384)
             for kind in ("int8", "w4", "gemm")}
    assert small[(1024, "int8")] == small[(64, "int8")] == (16, 64, 64, 4)
    assert small[(64, "w4")] == small[(1024, "gemm")] == (32, 32, 64, 4)
    assert triton_w4.set_tile_rule("no-small-m") == "small-m"
    try:
        large = {(m, kind): triton_w4.tiles(m, 256, kind, 256) for m, kind in small}
        with pytest.raises(ValueError, match="unknown tile rule 'tiny'.*small-m, no-small-m"):
            triton_w4.set_tile_rule("tiny")
        assert triton_w4.tiles(1024, 256, "int8", 256) == large[(1024, "int8")]
    finally:
        assert triton_w4.set_tile_rule("small-m") == "no-small-m"
    for (m, kind), t in small.items():  # the rules part at SMALL_M rows
        assert (t == large[(m, kind)]) == (m > 1024), (m, kind)
    assert large[(1024, "int8")] == (64, 128, 64, 4) and large[(64, "w4")] == (32, 64, 64, 4)

    # split-K only under "small-m-splitk" (with small-m's tiles): about 264 programs, at least 4 K blocks a split
    assert triton_w4.split_k(1024, 128, 1152, 16, 64, 64) == 1
    assert triton_w4.set_tile_rule("small-m-splitk") == "small-m"
    try:
        assert triton_w4.tiles(1024, 256, "int8", 256) == (16, 64, 64, 4)
        assert triton_w4.split_k(1024, 128, 1152, 16, 64, 64) == 3  # 128 tiles, 18 K blocks
        assert triton_w4.split_k(64, 256, 4608, 16, 64, 64) == 17  # 16 tiles, 72 K blocks
        assert triton_w4.split_k(16, 512, 512, 16, 64, 64) == 2  # 8 tiles, but only 8 K blocks
        assert triton_w4.split_k(262144, 128, 1152, 128, 128, 128) == 1  # enough tiles
        monkeypatch.setattr(triton_w4, "INTERPRET", True)
        assert triton_w4.split_k(64, 256, 4608, 16, 64, 64) == 1  # the interpreter: tests pass split_k themselves
    finally:
        triton_w4.set_tile_rule("small-m")


def test_conv_paths_probe_im2col_is_exact_and_timings_need_a_gpu(tmp_path):
    """benchmarks/probe_conv_paths.py: its int8 im2col (k ordered (r, s, c)) + torch._int_mm equals a float64 conv of
    the same integers (CPU smoke run); without a GPU the timing run stops with a clear message and writes nothing."""
    script = CHECKS.parent.parent / "benchmarks" / "probe_conv_paths.py"
    r = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "s"), "--device", "cpu", "--smoke"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "s" / "conv_paths.json").read_text())
    assert len(res["cases"]) == 2 and all(c["im2col_int8_exact"] is True for c in res["cases"])
    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "g")], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode != 0 and "needs a CUDA GPU" in r.stderr and not (tmp_path / "g").exists()


def _sm90_ttgir(halo: bool, w4: bool, offset: bool = False, kmajor: bool = False) -> str:
    """`_int8_conv_kernel` compiled for sm_90 (an H100 / H200) on this machine, no GPU needed (triton.compile with an
    explicit target; ptxas ships with triton): its TTGIR at the batch-256 rule's tiles for a 3x3 conv, C = O = 128 at
    32x32, specialised as a launch would specialise it (pointers and multiples of 16 marked divisible by 16, ints of 1
    as constants); `kmajor`: with the K-major weight (`W_KMAJOR`, row stride K for int8)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gacq.export import triton_int8

    fn = triton_int8._int8_conv_kernel
    c, o, hw = 128, 128, 32
    bm, bn, bk = (256, 128, 64) if w4 else (128, 128, 128)
    hp = hw + 2 if halo else hw
    ints = dict(M=256 * hw * hw, O=o, C=c, H=hw, W=hw, HO=hw, WO=hw, sxn=hp * hp * c, sxc=1, sxh=hp * c, sxw=c,
                swk=(c * 9 + 1) // 2 if w4 else c * 9 if kmajor else o, syn=o * hw * hw, syc=hw * hw, syh=hw, syw=1,
                SH=1, SW=1, PH=1, PW=1, DH=1, DW=1)
    consts = dict(K=c * 9, KH=3, KW=3, HAS_OFFSET=offset, HAS_BIAS=True, W4=w4, ALIGNED=True, BLOCK_M=bm, BLOCK_N=bn,
                  BLOCK_K=bk, PER_ROW=False, KB_PER=1, SPLIT=1, HALO=halo, EVEN_K=halo, W_KMAJOR=kmajor)
    ptrs = dict(x8_ptr="*i8", w_ptr="*u8" if w4 else "*i8", wzero_ptr="*i32", wscale_ptr="*fp32", woff_ptr="*i32",
                row_ptr="*i32", bias_ptr="*fp32", y_ptr="*bf16", ascale_ptr="*fp32", azp_ptr="*fp32",
                part_ptr="*i32", rpart_ptr="*i32")
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = consts.get(name, ints.get(name))
        if name in consts or value == 1:
            sig[name], constexprs[name] = "constexpr", value
        elif name in ptrs or name in ints:
            sig[name] = ptrs.get(name, "i32")
            if name in ptrs or value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:  # qmin, qmax, center
            sig[name] = "fp32"
    kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 8, "num_stages": 3})
    return kernel.asm["ttgir"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles the kernel: not in the interpreter")
@pytest.mark.parametrize("w4", [False, True], ids=["int8", "w4a8"])
def test_halo_tile_streams_into_shared_memory_on_sm90(w4):
    """What the halo path is for, read off the compiled kernel (Triton 3.6's TTGIR for sm_90; not a timing): its input
    tile is copied asynchronously into shared memory (cp.async, pipelined over the K loop) and the wgmma reads it
    there, with no select or register round trip in between; the masked path's tile is loaded to registers from
    shared memory, selected (pad code, k < K) and stored back before the wgmma. (The weight tile of the stored weight,
    (K8, O8) with O contiguous, is loaded to registers and stored to shared memory every iteration either way: not
    pipelined; the K-major weight's is, `test_kmajor_weight_tile_streams_into_shared_memory_on_sm90`.)"""
    import re

    import triton

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("triton without its NVIDIA backend")
    bm, bk = (256, 64) if w4 else (128, 128)
    tile = f"{bm}x{bk}xi8"
    for offset in (False, True) if not w4 else (False,):  # HAS_OFFSET: the row sums read the tile from shared memory
        halo = _sm90_ttgir(True, w4, offset)
        assert re.search(rf"async_copy_global_to_local .*tensor<{bm}x{bk}x!tt\.ptr<i8>", halo), "tile not cp.async"
        assert re.search(rf"warp_group_dot %\S+, %\S+, %\S+ .*: !ttg\.memdesc<{tile}", halo), "wgmma not from smem"
        assert not re.search(rf"arith\.select .*tensor<{tile}", halo), "a select on the tile"
    masked = _sm90_ttgir(False, w4)
    assert re.search(rf"arith\.select .*tensor<{bm}x{bk}xi1, #\S+>, tensor<{tile}", masked)  # the pad code's select
    assert re.search(rf"warp_group_dot %\S+, %\S+, %\S+ .*: tensor<{tile}, #ttg\.dot_op", masked)  # from registers


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles the kernel: not in the interpreter")
def test_kmajor_weight_tile_streams_into_shared_memory_on_sm90():
    """What the K-major weight (`int8_conv2d(w_kmajor=True)`, k in (r, s, c) order) is for, read off Triton 3.6's TTGIR
    for sm_90 (not a timing): the int8 weight tile is copied asynchronously into its own multi-buffered shared memory
    (cp.async, pipelined over the K loop) as the input tile is, and the wgmma reads both operands there, with no
    register -> shared store of either tile on the halo path; on the masked path the weight tile streams the same way
    (the input tile still goes through registers for its selects). With the stored (K8, O8) weight the weight tile is
    loaded to registers and stored to shared memory every iteration. Not changed by it: each wgmma is still waited for
    in its own iteration (warp_group_dot_wait pendings = 0), and a W4A8 weight tile (packed nibbles, unpacked in
    registers) is loaded to registers and stored to shared memory either way."""
    import re

    import triton

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("triton without its NVIDIA backend")
    tile = "128x128xi8"
    copy = re.compile(rf"async_copy_global_to_local .*: tensor<128x128x!tt\.ptr<i8>, #\w+> -> <{tile}, #(\w+)")
    smem = rf"!ttg\.memdesc<{tile}, #\w+, #smem, mutable>"  # a slot of a multi-buffered (pipelined) allocation
    stored = rf"ttg\.local_alloc %\S+ : \(tensor<{tile}"  # a tile stored from registers to shared memory
    for offset in (False, True):  # HAS_OFFSET: the row sums also read the input tile
        kmajor = _sm90_ttgir(True, False, offset, kmajor=True)
        assert len(set(copy.findall(kmajor))) == 2, "input and weight tiles not both cp.async"
        assert re.search(rf"warp_group_dot %\S+, %\S+, %\S+ .*: {smem} \* {smem}", kmajor), "wgmma not from smem"
        assert not re.search(stored, kmajor), "a tile stored from registers"
        assert re.search(r"warp_group_dot_wait .*pendings = 0", kmajor)  # still waited for in its own iteration
    old = _sm90_ttgir(True, False)
    assert len(set(copy.findall(old))) == 1 and re.search(stored, old)  # the weight through registers
    masked = _sm90_ttgir(False, False, kmajor=True)
    assert len(set(copy.findall(masked))) == 2
    assert re.search(rf"warp_group_dot %\S+, %\S+, %\S+ .*: tensor<{tile}, #ttg\.dot_op<[^>]*>> \* {smem}", masked)
    w4 = _sm90_ttgir(True, True, kmajor=True)  # (256, 128, 64) tiles
    assert re.search(r"tt\.load .*: tensor<128x64x!tt\.ptr<i8>", w4)  # the packed bytes to registers
    assert re.search(r"warp_group_dot %\S+, %\S+, %\S+ .*\* !ttg\.memdesc<64x128xi8, #\w+, #smem> ", w4)


def _plain_gemm_ttgir(dtype: str) -> str:
    """A plain K-looped GEMM (the textbook Triton matmul: (128, 128, 128) tiles, 8 warps, 3 stages, both operands
    K-major, no masks) of `dtype` inputs compiled for sm_90 on this machine: int8 accumulates in int32, the floating
    types in float32."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def gemm(a_ptr, b_ptr, c_ptr, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             INT: tl.constexpr):
        om = tl.program_id(0) * BM + tl.arange(0, BM)
        on = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.int32 if INT else tl.float32)
        for kb in range(0, K // BK):
            kk = kb * BK + tl.arange(0, BK)
            a = tl.load(a_ptr + om[:, None] * K + kk[None, :])
            b = tl.load(b_ptr + on[None, :] * K + kk[:, None])
            acc = tl.dot(a, b, acc, out_dtype=acc.dtype)  # fp8: `acc +=` is not folded into the MMA
        tl.store(c_ptr + om[:, None] * (BN * tl.num_programs(1)) + on[None, :], acc)

    integer = dtype == "i8"
    sig = dict(a_ptr=f"*{dtype}", b_ptr=f"*{dtype}", c_ptr="*i32" if integer else "*fp32", K="constexpr",
               BM="constexpr", BN="constexpr", BK="constexpr", INT="constexpr")
    consts = dict(K=1152, BM=128, BN=128, BK=128, INT=integer)
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(3)}
    kernel = triton.compile(ASTSource(gemm, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 8, "num_stages": 3})
    return kernel.asm["ttgir"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles the kernel: not in the interpreter")
def test_triton_waits_for_every_int32_accumulating_wgmma_on_sm90():
    """What bounds the int8 / W4A8 kernels' K loop in Triton (3.6), read off the compiled TTGIR (not a timing): its
    Hopper pipeliner lets a wgmma run on while the next K block is prepared ("properly async":
    `warp_group_dot_wait {pendings = 1}` after it) only when the accumulator is float32 (WGMMAPipeline.cpp,
    `dotCanBeProperlyAsync`, rule 2.1). int8 tensor-core products accumulate in int32, so even the textbook int8 GEMM,
    both tiles cp.async'd, waits for each wgmma to finish in its own iteration (pendings = 0), as
    `_int8_conv_kernel` does on every path; the same GEMM in fp16, bf16 or fp8 (float32 accumulator) is pipelined."""
    import re

    import triton

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("triton without its NVIDIA backend")
    waits = {}
    for dtype in ("i8", "fp16", "bf16", "fp8e4nv"):
        ttgir = _plain_gemm_ttgir(dtype)
        loop = ttgir[ttgir.index("scf.for"):ttgir.index("scf.yield")]
        assert len(re.findall(r"async_copy_global_to_local", loop)) == 2, dtype  # both tiles pipelined
        assert re.search(r"warp_group_dot %\S+, %\S+, %\S+ .*isAsync = true.*!ttg\.memdesc<.*\* !ttg\.memdesc<",
                         loop), dtype  # both operands read from shared memory
        waits[dtype] = [int(p) for p in re.findall(r"warp_group_dot_wait .*pendings = (\d+)", loop)]
    assert waits == {"i8": [0], "fp16": [1], "bf16": [1], "fp8e4nv": [1]}


def _fp8_conv_ttgir(precise_acc: bool = False) -> str:
    """`triton_fp8._fp8_conv_kernel` compiled for sm_90 on this machine (as `_sm90_ttgir`: a 3x3 conv, C = O = 128 at
    32x32, batch 256, (128, 128, 128) tiles, 8 warps, 3 stages, the halo buffer and the K-major weight)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gacq.export import triton_fp8

    fn = triton_fp8._fp8_conv_kernel
    c, o, hw = 128, 128, 32
    hp = hw + 2
    ints = dict(M=256 * hw * hw, O=o, C=c, HP=hp, WP=hp, HO=hw, WO=hw, sxn=hp * hp * c, sxh=hp * c, sxw=c, swk=c * 9,
                syn=o * hw * hw, syc=hw * hw, syh=hw, syw=1, SH=1, SW=1, DH=1, DW=1)
    consts = dict(K=c * 9, KH=3, KW=3, HAS_BIAS=True, ALIGNED=True, EVEN_K=True, PRECISE_ACC=precise_acc,
                  BLOCK_M=128, BLOCK_N=128, BLOCK_K=128)
    ptrs = dict(q_ptr="*fp8e4nv", w_ptr="*fp8e4nv", wscale_ptr="*fp32", bias_ptr="*fp32", y_ptr="*bf16",
                ascale_ptr="*fp32")
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = consts.get(name, ints.get(name))
        if name in consts or value == 1:
            sig[name], constexprs[name] = "constexpr", value
        else:
            sig[name] = ptrs.get(name, "i32")
            if name in ptrs or value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 8, "num_stages": 3})
    return kernel.asm["ttgir"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles the kernel: not in the interpreter")
def test_fp8_conv_wgmma_is_pipelined_on_sm90():
    """Why the fp8 backend's conv is FP8 (read off Triton 3.6's TTGIR for sm_90; not a timing): with a float32
    accumulator its wgmma is "properly async" (`warp_group_dot_wait {pendings = 1}`: left running while the next K
    block is prepared), which no int32-accumulating (int8) Triton GEMM gets
    (`test_triton_waits_for_every_int32_accumulating_wgmma_on_sm90`); and both tiles, the halo buffer's input codes and
    the K-major weight codes, are copied asynchronously into shared memory and read there by the wgmma."""
    import re

    import triton

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("triton without its NVIDIA backend")
    ttgir = _fp8_conv_ttgir()
    loop = ttgir[ttgir.index("scf.for"):ttgir.index("scf.yield")]
    tile = "128x128xf8E4M3FN"
    assert len(re.findall(r"async_copy_global_to_local .*tensor<128x128x!tt\.ptr<f8E4M3FN>", loop)) == 2
    assert re.search(rf"warp_group_dot %\S+, %\S+, %\S+ .*isAsync = true.*!ttg\.memdesc<{tile}.*\* "
                     rf"!ttg\.memdesc<{tile}", loop), "wgmma not from shared memory"
    assert [int(p) for p in re.findall(r"warp_group_dot_wait .*pendings = (\d+)", loop)] == [1]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles the kernel: not in the interpreter")
def test_fp8_conv_precise_acc_promotes_each_k_block_and_stays_async_on_sm90():
    """`precise_acc` (`FP8Layer.precise_acc`): the wgmma carries maxNumImpreciseAcc = BLOCK_K (128), so its products
    are added into the float32 accumulator after each K block, where the default carries Triton's sm_90 default
    2^30 (never); and the wgmma is still left running over the next block's loads (pendings = 1). Read off the TTGIR,
    not timed."""
    import re

    import triton

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("triton without its NVIDIA backend")
    for precise, limit in ((False, 2 ** 30), (True, 128)):
        ttgir = _fp8_conv_ttgir(precise)
        loop = ttgir[ttgir.index("scf.for"):ttgir.index("scf.yield")]
        assert [int(v) for v in re.findall(r"warp_group_dot .*maxNumImpreciseAcc = (\d+)", loop)] == [limit]
        assert [int(p) for p in re.findall(r"warp_group_dot_wait .*pendings = (\d+)", loop)] == [1]
