"""Data-parallel EBT training: what DDP needs for the second-order step.

An EBT step takes the energy's gradient with ``create_graph=True`` inside the forward (MCMC
refinement of the candidates), then back-propagates the loss through those gradients with one
``backward()``.  Under ``DistributedDataParallel`` that works, and the gradients equal the
single-process gradients of the whole batch, on two conditions that ``wrap_ddp`` sets:

- the forward DDP sees is the whole loss (``LossStep``): the inner ``autograd.grad`` runs inside it
  and only with respect to the candidates, never into the parameters' ``.grad``; the one
  ``backward()`` afterwards is the one DDP all-reduces;
- ``find_unused_parameters=True``: the energy's gradient with respect to the candidates does not
  depend on the biases of the last layer norm and the energy head (they shift every candidate's
  energy alike), so those parameters get no gradient.  DDP without the flag waits for them, never
  all-reduces the bucket they share with others and hands back each process's own, un-averaged
  gradients -- without an error in that step.  ``static_graph=True`` works too.

FSDP2 (``fully_shard``) does not run this step correctly yet: its hooks treat the inner
``autograd.grad`` as the end of a backward -- they reshard the parameters (the refinement then
multiplies by a sharded one) or, with ``set_reshard_after_backward(False)``, reduce the gradients
there and leave none for the real backward.  ``tests/test_distributed.py`` keeps a strict expected
failure that says so.
"""

from __future__ import annotations

import torch


class LossStep(torch.nn.Module):
    """The EBT loss as a module's forward (what DDP wraps)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens, targets):
        return self.model.loss(tokens, targets)


def wrap_ddp(model: torch.nn.Module, device: torch.device):
    """``DistributedDataParallel`` over the model's loss, set up for the second-order step."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(LossStep(model), device_ids=ids, find_unused_parameters=True)


def init_from_env(device_name: str) -> tuple:
    """(rank, world size, device) of a process started by ``torchrun``: gloo on CPU, NCCL on CUDA
    (one GPU per process, by LOCAL_RANK)."""
    import os

    import torch.distributed as dist

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if device_name.startswith("cuda"):
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        device = torch.device(device_name)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    return rank, world, device
