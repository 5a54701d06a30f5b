"""What the multi-process tests share."""

import torch.distributed as dist


def shut_down() -> None:
    """Leave the process group the way PyTorch asks for: all ranks meet, then each destroys its group.

    Without ``destroy_process_group``, gloo work left by a collective (FSDP2's included) can outlive the interpreter
    and abort the worker at exit ("terminate called without an active exception", pytorch/pytorch#179291); without
    the barrier first, a rank that finishes early tears its side down while the other may still be using it. Both
    were seen once in CI, in a worker that ran FSDP2.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
