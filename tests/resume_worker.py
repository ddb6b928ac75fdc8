"""Run in a fresh process by test_subspace.py (S1): load a checkpoint into new objects and continue.

Usage: python resume_worker.py JOBS.json, where each job names an optimizer of optim_db, a checkpoint
written by the test, the number of steps to continue, and where to save the final model/optimizer.
"""

import json
import sys

import torch

from helpers import TinyNet, batches, groups_for, train
from optim_db import BY_NAME

for job in json.load(open(sys.argv[1])):
    ckpt = torch.load(job["checkpoint"], weights_only=True)
    model = TinyNet(seed=123)  # deliberately different init: everything must come from the checkpoint
    model.load_state_dict(ckpt["model"])
    opt = BY_NAME[job["optimizer"]].make(groups_for(model))
    opt.load_state_dict(ckpt["optimizer"])
    train(model, opt, batches(job["total"])[job["start"]:])
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, job["out"])
