"""Run in a fresh process by test_subspace.py (S1): load a checkpoint into new objects and continue.

Usage: python resume_worker.py JOBS.json SRC, where each job names an optimizer of optim_db, a
checkpoint written by the test, the number of steps to continue, and where to save the final
model/optimizer; SRC is the tree's src/ folder, which the imported library must come from (an
installed copy elsewhere would make the test check other code than the tree's).
"""

import json
import sys
from pathlib import Path

import torch

import subspace_optim
from helpers import TinyNet, batches, groups_for, train
from optim_db import BY_NAME

library = Path(subspace_optim.__file__).resolve()
if not library.is_relative_to(Path(sys.argv[2]).resolve()):
    sys.exit(f"resume_worker: imported {library}, not the library under {sys.argv[2]}")

for job in json.load(open(sys.argv[1])):
    ckpt = torch.load(job["checkpoint"], weights_only=True)
    model = TinyNet(seed=123)  # deliberately different init: everything must come from the checkpoint
    model.load_state_dict(ckpt["model"])
    opt = BY_NAME[job["optimizer"]].make(groups_for(model))
    opt.load_state_dict(ckpt["optimizer"])
    train(model, opt, batches(job["total"])[job["start"]:])
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, job["out"])
