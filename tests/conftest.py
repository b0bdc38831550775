"""Shared fixtures: tiny real diffusers models and real data files on disk."""

from __future__ import annotations

import os

# numpy's OpenBLAS spawns one thread per core; next to torch's OpenMP threads (which spin after every op) the two pools
# oversubscribe a small CI machine: on 2 cores one 512x512 eigh (the sFID of every `evaluate`) took 0.1-2.7 s instead
# of 0.04 s. One BLAS thread, set before numpy loads and inherited by every `gacq` subprocess, gives the same figures
# (the same numpy in every process) without the contention; torch's own threads (MKL / OpenMP) are untouched.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Every evaluation against the shipped training statistics needs their 10,000 features' k-NN radii (precision and
# recall): about 4 s on this CPU, cached on disk since session 50 (gacq.metrics.precision_recall.reference_radii).
# The run's interpreters (xdist workers, `gacq` subprocesses) share a cache of their own, made here and removed at
# the end: each run computes the radii afresh once, and never reads or writes the user's ~/.cache/gacq.
if not os.environ.get("GACQ_CACHE_DIR"):
    import atexit  # noqa: E402
    import shutil as _shutil  # noqa: E402
    import tempfile  # noqa: E402

    os.environ["GACQ_CACHE_DIR"] = tempfile.mkdtemp(prefix="gacq-test-cache-")
    atexit.register(_shutil.rmtree, os.environ["GACQ_CACHE_DIR"], True)

import gzip  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from gacq.models import build_model, save_model  # noqa: E402


# Test files by their wall time, longest first (measured in one process on a 2-core AMD EPYC, session 46), then the
# rest in collection order. Under pytest-xdist, --dist loadfile hands whole files to the workers in this order (with
# --no-loadscope-reorder; pytest_configure sets both), so the long files do not start last. The Triton interpreter's
# file comes first: its jobs (about 820 s of CPU) hold one worker while the other runs the rest.
FIRST = ["test_triton_w4.py", "test_experiment.py", "test_gpu_call_scripts.py", "test_distributed.py", "test_export.py",
         "test_cli.py", "quant/test_gac.py", "test_conditional.py", "test_latent.py", "quant/test_recon.py"]


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """The environment of the interpreters the tests start, set in the process that runs the tests.

    Every interpreter a test starts (`gacq` subprocesses, torchrun workers, scripts) runs as after the README's base
    install, without the `test` extra's transformers and scipy (tests/base_install/sitecustomize.py hides them):
    diffusers imports both when present, 3.5-4 s of the 10 s a new interpreter spends on imports on a 2-core AMD EPYC.

    A pytest-xdist controller (the README's `-n 2`) runs no tests: its workers are pytest processes and set this up
    for themselves. The controller gives them one torch thread each (inherited by the interpreters they start), so
    that two OpenMP pools do not contend for two cores (session 47: 194% CPU over the suite this way; two threads
    each, by accident in session 48: 34.3 min against 22.7, below). A bare `-n N` means whole files per worker, in
    FIRST's order: each file's module fixtures are then built once, and the long files start first (xdist's default
    scheduler would split files across workers, and its file scheduler orders files by their number of tests)."""
    if getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        # an empty value counts as unset: libgomp rejects it ("Invalid value") and runs one thread per core, which
        # made a session-48 run with `OMP_NUM_THREADS=` take 34.3 min (3,857 s of user CPU; da0600b: 22.7 min)
        if not os.environ.get("OMP_NUM_THREADS"):
            os.environ["OMP_NUM_THREADS"] = "1"
        if config.option.dist == "load":  # what xdist makes of a bare -n
            config.option.dist = "loadfile"
            config.option.loadscopereorder = False
        return
    base_install = os.path.join(os.path.dirname(os.path.abspath(__file__)), "base_install")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [base_install, os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("GACQ_TEST_HIDE", "transformers,scipy")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In xdist workers only: in one process the Triton jobs run niced from collection, in the gaps, and their file
    is best left where it is (late)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    here = Path(__file__).parent
    rank = {name: i for i, name in enumerate(FIRST)}

    def key(item: pytest.Item) -> int:
        try:
            return rank.get(Path(item.path).relative_to(here).as_posix(), len(FIRST))
        except ValueError:
            return len(FIRST)

    items.sort(key=key)  # stable: within a file, and among the rest, collection order


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the Triton interpreter's jobs (tests/test_triton_w4.py) as soon as their tests are selected: niced,
    they run in the idle gaps the rest of the suite leaves instead of blocking one test for minutes. Not in an xdist
    worker: every worker collects every test, and the jobs start with the file's first test in the one that runs it."""
    import tempfile

    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    mods = {item.module for item in session.items
            if "interpreter_jobs" in getattr(item, "fixturenames", ()) and hasattr(item, "module")}
    for mod in mods:
        root = Path(tempfile.mkdtemp(prefix="gacq-interpreter-"))
        session.config.add_cleanup(lambda r=root: shutil.rmtree(r, ignore_errors=True))
        session.config.add_cleanup(mod.stop_early)  # runs before the folder goes (cleanups run last-in first-out)
        mod.start_early(root)


def perturbed_tiny_dit(seed: int = 0) -> torch.nn.Module:
    """The `tiny-dit` config with every parameter nudged: adaLN-Zero starts at zero, and a perturbed model carries
    signal on every path (and its labels matter)."""
    torch.manual_seed(seed)
    model = build_model("tiny-dit").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def gacq_here(*args, cwd=None) -> subprocess.CompletedProcess:
    """`gacq ARGS` in this process, through the command's own entry point (`gacq.cli.main`, what `python -m gacq`
    runs): the same parsing, command code, error handler and exit status, stdout and stderr captured as a
    CompletedProcess; an uncaught exception gives exit status 1 and its traceback on stderr, as the interpreter does.
    For quick commands and refusals: a new interpreter spends 2-7 s (2 cores) importing torch and diffusers again.
    The end-to-end runs (and at least one refusal per file's kind of run) stay real subprocesses."""
    import contextlib
    import io
    import logging
    import random
    import traceback

    from gacq import cli

    out, err = io.StringIO(), io.StringIO()
    argv, here = sys.argv, os.getcwd()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = []  # main()'s basicConfig then logs to this call's stderr
    # what a command may change for the process, restored after it (the next tests, and the subprocesses they start,
    # see what they saw before): e.g. `experiment run` sets GACQ_FUSED_FAKE_QUANT=1 for its --parallel children
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    threads = torch.get_num_threads()
    environ = dict(os.environ)
    tf32 = torch.backends.cuda.matmul.allow_tf32  # `experiment run` sets the spec's
    try:
        if cwd is not None:
            os.chdir(cwd)
        sys.argv = ["gacq", *map(str, args)]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
                rc = 0
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    rc = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    rc = 1
            except BaseException:  # noqa: BLE001 -- what the interpreter does with an uncaught exception
                traceback.print_exc()
                rc = 1
    finally:
        sys.argv = argv
        os.chdir(here)
        root.handlers, root.level = handlers, level
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return subprocess.CompletedProcess(["gacq", *map(str, args)], rc, out.getvalue(), err.getvalue())


def write_images(root: Path, classes=("cat", "dog"), per_class=6, size=16, seed=0, fmt="png") -> Path:
    """A class-per-subfolder image folder with distinguishable classes."""
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            arr[: size // 2] = (40 + 160 * k) % 256
            Image.fromarray(arr).save(root / c / f"{i:03d}.{fmt}")
    return root


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_images(tmp_path / "imgs")


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    return save_model(model, tmp_path / "tiny_model")
