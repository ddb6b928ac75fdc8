"""Updates inside backward under DDP: a DDP communication hook that all-reduces each bucket as DDP's
default does and then hands its gradients to the optimizer's in-backward handle (the pattern of
torch's DDP optimizer overlap, ``ddp_comm_hooks.optimizer_overlap_hooks``). A parameter's own
post-accumulate hook would run before DDP's reducer has even copied the local gradient into its
bucket, so it cannot be used under DDP."""

from __future__ import annotations


def install_comm_hook(ddp, optimizer) -> None:
    """A DDP communication hook: DDP's default all-reduce (sum, divided by the world size), then the
    bucket's gradients go to the optimizer's active handle, if any. Registered once per DDP module."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    if getattr(ddp, "_subspace_in_backward", None) is optimizer:
        return
    if getattr(ddp, "_subspace_in_backward", None) is not None:
        raise RuntimeError("step_in_backward: this DDP module is already bound to another optimizer")

    def hook(process_group, bucket):
        future = allreduce_hook(process_group, bucket)
        handle = optimizer._in_backward
        if handle is None:
            return future
        if bucket.is_last():
            _after_ddp_finalize(handle)

        def update(fut):
            buffer = fut.value()
            for p, g in zip(bucket.parameters(), bucket.gradients()):
                if p in handle._index:
                    handle._arrive(p, g, owned=False)
            return buffer

        return future.then(update)

    ddp.register_comm_hook(None, hook)
    ddp._subspace_in_backward = optimizer


def _after_ddp_finalize(handle) -> None:
    """At the end of this backward, after DDP's finalize has copied the reduced buckets back into
    ``.grad``, drop those copies: the handle has used them, and the next micro-batch's local gradient
    must not accumulate onto them. DDP queues its finalize callback after the last bucket's
    communication hook, so a callback queued here queues the dropping one behind it."""
    from torch.autograd import Variable

    def drop_grads():
        for p in handle._index:
            p.grad = None

    Variable._execution_engine.queue_callback(lambda: Variable._execution_engine.queue_callback(drop_grads))
