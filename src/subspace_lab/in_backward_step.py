"""One training step of the lab with updates inside backward (`--step-in-backward`).

The optimizer's in-backward handle updates every weight as its gradient completes, so there is no
global gradient norm to log or clip: `--clip` clips each parameter's gradient on its own
(`grad_accum` 1 only). Non-finite losses and gradients follow the optimizer's `nonfinite` policy
(the lab's `--nonfinite`): 'skip' counts a skipped step and changes nothing, 'error' stops the run
with `NonFiniteLossError` before anything was updated (or says that the step was torn).
"""
from __future__ import annotations

import torch

from . import distributed as D
from .models import lm_nll


def start(opt, cfg, ddp_model):
    """The optimizer's in-backward handle for this run's settings."""
    if not hasattr(opt, "step_in_backward"):
        raise ValueError(f"--step-in-backward needs a subspace optimizer; {cfg.optim.method} has no "
                         "updates in backward")
    clip = cfg.clip if cfg.clip > 0 else None
    return opt.step_in_backward(accumulate=cfg.grad_accum, max_grad_norm=clip, ddp=ddp_model)


def step(handle, model, opt, data, cfg, info, device, autocast, error_cls):
    """`grad_accum` micro-batches with the updates inside their backward, then `opt.step()` to close
    the step. Returns the mean loss across ranks and whether the step was skipped."""
    from subspace_optim.in_backward import NonFiniteGradientError

    skipped_before = opt.skipped_steps
    loss_sum = torch.zeros((), device=device)
    for _ in range(cfg.grad_accum):
        x = data.next_batch(cfg.batch_size, info.rank, info.world_size).to(device)
        with autocast():
            nll, n = lm_nll(model, x)
        loss = nll / n
        try:
            handle.backward(loss / cfg.grad_accum)
        except NonFiniteGradientError as e:
            raise error_cls(f"{e} (use --nonfinite skip to skip such steps)") from e
        loss_sum += loss.detach()
    opt.step()
    return D.mean_across(info, loss_sum / cfg.grad_accum), opt.skipped_steps > skipped_before
