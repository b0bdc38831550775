"""Data parallelism over torch.distributed: one process per GPU (NCCL) or per CPU share (gloo).

Launch with torchrun (`python -m torch.distributed.run --standalone --nproc-per-node N -m -- gacq
sample ...`; without the `--` torchrun's parser takes `--num` for its own `--numa-binding`), or give
`--gpus N` to `gacq sample`, `gacq calib` or `gacq eval`, which re-launches the command that way.
Inside, `session(device)` forms the process group and gives each rank its device (cuda:LOCAL_RANK
on GPUs).

`gacq.sampling.sample`, `gacq.quant.calib_data.collect` and `gacq.metrics.compute_stats` /
`evaluate` are collective once a group exists: every rank calls them with the same arguments,
each does a disjoint, deterministic share of the work (`owned`), and rank 0 writes the result.
Without a group they run as one process, rank 0 of 1. The work is split into the same model
calls as in one process, so the results are bit-identical to it; on the CPU only at the same
intra-op thread count (OMP_NUM_THREADS), since CPU kernels sum in an order that depends on it.
`--gpus N` gives each worker cores // N threads unless OMP_NUM_THREADS is set.

Failures: torchrun stops the surviving ranks when one exits with an error, and its summary
names the failed rank with our message (`record_failure` writes torchrun's error file).
Without torchrun's agent, every collective here times out after GACQ_DIST_TIMEOUT_S seconds
(default 1800) with a GacqError instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import GacqError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800.0

_object_group = None  # gloo group for object collectives when the default group is NCCL
_formed_group = False  # whether this process formed a process group (see `exit_now`)


# ---- where am I -------------------------------------------------------------------------------

def in_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets its variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the process group; 0 without a group."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Processes in the group; 1 without a group."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def owned(n: int, rank: int, world: int) -> range:
    """The items of `range(n)` that `rank` of `world` works on: every world-th, from its rank.

    Round-robin keeps the ranks' loads within one item of each other for any n.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    return range(rank, n, world)


def timeout() -> datetime.timedelta:
    """How long a rank waits for the others (GACQ_DIST_TIMEOUT_S seconds, default 1800)."""
    text = os.environ.get("GACQ_DIST_TIMEOUT_S", "")
    try:
        secs = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        secs = -1.0
    if not secs > 0:
        raise GacqError(f"GACQ_DIST_TIMEOUT_S must be a positive number of seconds, got {text!r}")
    return datetime.timedelta(seconds=secs)


def where() -> str:
    """'rank r of w' (from the group, or torchrun's variables before it is formed); '' for one process."""
    if is_initialized():
        return f"rank {rank()} of {world_size()}" if world_size() > 1 else ""
    if in_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        return f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}"
    return ""


# ---- the process group ------------------------------------------------------------------------

def init(device: torch.device) -> torch.device:
    """Form the process group if torchrun started us; returns this rank's device.

    gloo on the CPU, NCCL on CUDA (each rank on cuda:LOCAL_RANK, plus a gloo group for the
    small object collectives). Outside torchrun, or when a group exists already, only the
    device is worked out.
    """
    global _object_group, _formed_group
    device = torch.device(device)
    if not in_torchrun():
        return device
    world = int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        if device.index is not None and world > 1:
            raise GacqError(f"--device {device} names one GPU, but {world} processes run: use --device cuda "
                            "(rank r takes cuda:LOCAL_RANK; pick GPUs with CUDA_VISIBLE_DEVICES)")
        if local_rank() >= torch.cuda.device_count():
            raise GacqError(f"{where()} needs cuda:{local_rank()}, but only {torch.cuda.device_count()} "
                            "GPU(s) are visible: ask for fewer processes")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise GacqError(f"distributed runs support cpu and cuda devices, not {device.type}")
    if is_initialized():
        return device
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=timeout(), device_id=device if backend == "nccl" else None)
        _formed_group = True
        if backend == "nccl":
            _object_group = dist.new_group(backend="gloo", timeout=timeout())
    except (RuntimeError, ValueError) as e:  # DistStoreError and friends are RuntimeErrors
        raise GacqError(f"{where()}: could not form the {backend} process group of {world} processes "
                        f"within {timeout().total_seconds():.0f} s: {e}") from e
    return device


def shutdown() -> None:
    global _object_group
    if is_initialized():
        dist.destroy_process_group()
    _object_group = None


@contextlib.contextmanager
def session(device: torch.device | str) -> Iterator[torch.device]:
    """`init` on entry (yields this rank's device), `shutdown` on a normal exit.

    Under torchrun, SIGTERM (what torchrun sends the other ranks when one fails) becomes
    SystemExit, so that atomic writes in progress remove their temporary files. After an
    error the group is left to the ending process: destroying an NCCL group whose peers are
    gone can hang.
    """
    owns = not is_initialized()
    old_handler = None
    if in_torchrun():
        old_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield init(torch.device(device))
        if owns:
            # leave together: a rank that tears the group down while another still uses it (rank 0
            # assembling the output) can abort the job from gloo's threads
            barrier("finishing")
            shutdown()
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def formed_group() -> bool:
    """Whether this process formed a process group (it may be shut down by now)."""
    return _formed_group


def exit_now(code: int | str | None) -> None:
    """End this process with `code` (as `sys.exit` reads it) without the interpreter's finalization.

    A worker that formed a gloo group, even one shut down with `destroy_process_group`, can abort
    during finalization ("terminate called without an active exception", SIGABRT) when gloo's C++
    threads are torn down after Python's: seen once in CI, a 3-process `gacq sample` whose rank 0
    had written every output (pytorch/pytorch#190489 and #179291 describe the same teardown). The
    command's work is done and its files renamed into place by then, so the streams and the
    logging handlers are flushed here and the process leaves at once.
    """
    import logging

    if isinstance(code, str):  # sys.exit("message"): print it and exit 1
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0 if code is None else int(code))


# ---- collectives (identity for one process) ---------------------------------------------------

@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into a GacqError that says who waited for what."""
    try:
        yield
    except RuntimeError as e:  # gloo/NCCL errors (DistBackendError, timeouts) derive from it
        raise GacqError(f"{where()}: {what} failed: {e}. Another rank has probably failed: see its message; "
                        "rerun the same command (gacq sample resumes from its finished shards)") from e


def all_reduce_sum(tensors: list[torch.Tensor], what: str = "reducing gradients") -> None:
    """Sum each tensor over the ranks, in place (the default group: gloo on CPU, NCCL on CUDA)."""
    if world_size() == 1:
        return
    with _collective(what):
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def barrier(what: str = "waiting for the other ranks") -> None:
    """Wait for every rank; on gloo names the ranks that did not arrive within the timeout."""
    if world_size() == 1:
        return
    group = _object_group if _object_group is not None else None
    with _collective(what):
        dist.monitored_barrier(group=group, timeout=timeout(), wait_all_ranks=True)


def broadcast_object(obj: T, src: int = 0, what: str = "broadcast") -> T:
    """`obj` of rank `src` on every rank (small picklable objects)."""
    if world_size() == 1:
        return obj
    box = [obj]
    with _collective(what):
        dist.broadcast_object_list(box, src=src, group=_object_group)
    return box[0]


def all_gather_object(obj: Any, what: str = "gathering results") -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    with _collective(what):
        dist.all_gather_object(out, obj, group=_object_group)
    return out


def gather_object(obj: Any, dst: int = 0, what: str = "gathering results") -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank `dst`; None on the others."""
    if world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * world_size() if rank() == dst else None
    with _collective(what):
        dist.gather_object(obj, out, dst=dst, group=_object_group)
    return out


def on_rank0(fn: Callable[[], T], what: str) -> T:
    """Run `fn` on rank 0 only; every rank returns its result, or raises when it failed.

    Rank 0 re-raises its own exception; the others raise a GacqError with its message, so a
    refusal on rank 0 (a folder made with other settings, say) ends every rank the same way.
    """
    if world_size() == 1:
        return fn()
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 -- relayed to the other ranks, then re-raised
            error = e
    status = broadcast_object((None if error is None else f"{type(error).__name__}: {error}", result), what=what)
    if error is not None:
        raise error
    if status[0] is not None:
        raise GacqError(f"{where()}: rank 0 failed while {what}: {status[0]}")
    return status[1]


# ---- failures and launching -------------------------------------------------------------------

def record_failure(e: BaseException) -> str:
    """Put `e` into torchrun's error file (its summary then shows the message next to the
    failed rank); returns the 'rank r of w' prefix for the message, '' for one process."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(e)
    return where()


def fail_for_test(done: int, last: str) -> None:
    """Test hook: GACQ_TEST_FAIL_RANK=r makes rank r fail once it has finished
    GACQ_TEST_FAIL_AFTER (default 1) units of work in this run (`last` names the latest); with
    GACQ_TEST_FAIL_KILL=1 it kills itself with SIGKILL (a crash: no message, no clean-up)."""
    target = os.environ.get("GACQ_TEST_FAIL_RANK")
    if target is None or int(target) != rank() or done < int(os.environ.get("GACQ_TEST_FAIL_AFTER", "1")):
        return
    if os.environ.get("GACQ_TEST_FAIL_KILL") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    raise GacqError(f"{where() or 'rank 0 of 1'}: test failure (GACQ_TEST_FAIL_RANK) after {last}")


def relaunch(nproc: int, device: str | None, command: str) -> bool:
    """Run this command again under torchrun with `nproc` processes, unless we are one of them.

    Returns True when the torchrun job ran (and succeeded: a failure raises GacqError), False
    when the caller should do the work itself (one process, or already inside torchrun).
    OMP_NUM_THREADS defaults to the CPU cores divided among the processes.
    """
    if in_torchrun():
        n_local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if nproc > 1 and nproc != n_local:
            raise GacqError(f"--gpus {nproc} inside a torchrun job of {n_local} processes per node: "
                            "leave --gpus out under torchrun")
        return False
    if nproc == 1:
        return False
    if device is not None and device.startswith("cuda"):
        if ":" in device:
            raise GacqError(f"--gpus {nproc} with --device {device}: use --device cuda and pick the GPUs "
                            "with CUDA_VISIBLE_DEVICES")
        if torch.cuda.device_count() < nproc:
            raise GacqError(f"--gpus {nproc}, but {torch.cuda.device_count()} GPU(s) are visible")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "--", "gacq", *sys.argv[1:]]  # "--": torchrun would read --num as its --numa-binding
    rc = subprocess.run(cmd, env=env, check=False).returncode
    if rc != 0:
        raise GacqError(f"the {nproc}-process {command} failed (torchrun exit code {rc}); torchrun's summary "
                        "above names the failed rank and its error; rerun the same command (gacq sample "
                        "resumes from its finished shards)")
    return True
