"""Run by test_gac.py under torchrun: one GAC meta-gradient on the tiny float64 block of
test_gac.py with the validation groups split over the ranks; rank 0 saves it."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gacq import distributed as gdist  # noqa: E402
from tests.quant.test_gac import meta_grad_case  # noqa: E402

if __name__ == "__main__":
    with gdist.session("cpu"):
        assert gdist.world_size() > 1, "not started by torchrun"
        blk, batch, groups = meta_grad_case()
        grad, loss, info = blk.meta_grad(batch, groups)
        if gdist.rank() == 0:
            save_file({"grad": grad, "loss": loss.reshape(1), "gm": torch.tensor([info["gm"]], dtype=torch.float64)},
                      sys.argv[1])
