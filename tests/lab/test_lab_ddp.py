"""DDP on CPU: 2 processes under torchrun (gloo). Ranks read different shards, end with bitwise
identical weights; rank 0 alone writes metrics and checkpoints; the result matches one process
with the doubled batch."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from lab_helpers import lab_cache, make_cfg  # noqa: F401
from subspace_lab.train import train

WORKER = textwrap.dedent("""
    import json, os, sys, torch
    import torch.distributed as dist
    from subspace_lab.config import TrainConfig
    from subspace_lab import train as T
    cfg = TrainConfig.from_dict(json.loads(open(sys.argv[1]).read()))
    seen = []
    real_nll = T.lm_nll
    def spy(model, x):
        if model.training:
            seen.append(x.clone())
        return real_nll(model, x)
    T.lm_nll = spy
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    res = T.train(cfg)
    torch.save({"params": res.model.state_dict(), "batches": seen, "losses": res.losses},
               os.path.join(sys.argv[2], f"rank{rank}.pt"))
    dist.destroy_process_group()
    os._exit(0)  # gloo's threads can abort interpreter teardown at random (docs/testing.md, "Harness")
""")


def test_ddp_two_cpu_ranks(tmp_path, lab_cache):
    cfg = make_cfg(tmp_path / "ddp", lab_cache, optim__method="i3s", steps=6, checkpoint_every=3,
                   batch_size=2)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "worker.py").write_text(WORKER)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "worker.py"), str(tmp_path / "cfg.json"), str(tmp_path)],
        capture_output=True, text=True,
        # this tree's library, not whatever copy is installed (docs/testing.md, "Harness rules")
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1",
             "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    assert r0["losses"] == r1["losses"]  # all-reduced
    assert not any(torch.equal(a, b) for a, b in zip(r0["batches"], r1["batches"]))
    out = Path(cfg.out_dir)
    assert (out / "checkpoints" / "step-000006" / "manifest.json").exists()
    assert len([l for l in (out / "metrics.jsonl").read_text().splitlines()
                if '"event": "train"' in l]) == 6  # one writer
    # two ranks x batch 2 == one process x batch 4 on the same global batches
    single = train(make_cfg(tmp_path / "one", lab_cache, optim__method="i3s", steps=6, batch_size=4))
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(r0["params"][k], v, rtol=1e-3, atol=1e-4, msg=k)
