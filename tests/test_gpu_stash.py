"""scripts/gpu-dit-stash.sh in a throwaway git repository: `out` moves the bundled UNet, the test-split statistics,
models/ and results/ (but the kept results folder) out of the tree, and a `git add -A` while they are out stages no
deletion (session 27 committed one so); `in` brings every file back and leaves the tree clean."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ["gacq/assets/cifar10-features/stats_test.npz",
         "gacq/assets/cifar10-small/unet/diffusion_pytorch_model.safetensors", "models/dit-s6-cifar10/manifest.json", "results/other/README.md", "results/experiments/keep/cell.json",
         "gacq/code.py"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout


def test_stash_out_and_in_leave_git_clean(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "gpu-dit-stash.sh", repo / "scripts")
    for f in FILES:
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        (repo / f).write_text(f"content of {f}\n")
    git(repo, "init", "-q")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "add", ".")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    run = lambda *a: subprocess.run(["bash", "scripts/gpu-dit-stash.sh", *a, "results/experiments/keep"], cwd=repo,
                                    capture_output=True, text=True, check=True)  # noqa: E731
    run("out")
    assert not (repo / FILES[0]).exists() and not (repo / FILES[1]).exists() and not (repo / "models").exists()
    assert not (repo / "results/other").exists() and (repo / "results/experiments/keep/cell.json").exists()
    (repo / "gacq/code.py").write_text("changed\n")
    git(repo, "add", "-A")
    staged = git(repo, "diff", "--cached", "--name-status")
    assert staged.split() == ["M", "gacq/code.py"], staged  # the change, and no deletion of what is stashed
    git(repo, "reset", "-q")
    (repo / "gacq/code.py").write_text("content of gacq/code.py\n")
    run("in")
    for f in FILES:
        assert (repo / f).read_text() == f"content of {f}\n", f
    assert git(repo, "status", "--porcelain") == ""
    assert "S " not in git(repo, "ls-files", "-v")  # no file is left hidden from git
