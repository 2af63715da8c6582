"""Data-parallel EBT training: what DDP and FSDP2 need for the second-order step.

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

Under FSDP2 (``fully_shard``, ``wrap_fsdp2``) the inner ``autograd.grad`` is a backward too, and
FSDP2's hooks end it as one: by default they reshard the parameters there, and the refinement's
next step then mixes sharded and plain tensors.  ``set_reshard_after_backward(False)`` keeps them
unsharded through the step (the gradients are still reduce-scattered into the sharded
parameters at the step's real backward); ``finish_fsdp2_step`` reshards afterwards, which puts
the sharded parameters, with their gradients, back in the modules for the optimizer.  The
parameters must be at least one-dimensional (FSDP2 refuses scalars).
"""

from __future__ import annotations

import torch


class LossStep(torch.nn.Module):
    """The EBT loss as a module's forward (what DDP and FSDP2 wrap).  ``task`` runs the model's
    other entry points through the same forward -- ``"energy"`` (``second``: the candidates, None
    for the model's first candidate) and ``"refine"`` -- so that an FSDP2 model is only ever entered
    through its root, and reads its parameters only inside it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens, second=None, task: str = "loss"):
        if task == "loss":
            return self.model.loss(tokens, second)
        if task == "energy":
            if second is None:
                second = self.model.init_logits.expand(*tokens.shape, -1)
            return self.model.energy(tokens, second).clone()  # not a view: FSDP2 hooks the output
        if task == "refine":
            return self.model.refine(tokens, create_graph=False)
        raise ValueError(f"LossStep: unknown task {task!r}")


def wrap_ddp(model: torch.nn.Module, device: torch.device):
    """``DistributedDataParallel`` over the model's loss, set up for the second-order step."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(LossStep(model), device_ids=ids, find_unused_parameters=True)


def wrap_fsdp2(model: torch.nn.Module, mesh, reshard_after_forward: bool = True) -> torch.nn.Module:
    """FSDP2 over the model's transformer blocks and the loss step, set up for the second-order
    step; returns the loss step (call it, ``backward()``, then ``finish_fsdp2_step``)."""
    from torch.distributed.fsdp import fully_shard

    step = LossStep(model)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(step, mesh=mesh, reshard_after_forward=reshard_after_forward)
    step.set_reshard_after_backward(False, recurse=True)  # the inner autograd.grad must not reshard
    return step


def finish_fsdp2_step(step: torch.nn.Module) -> None:
    """After the step's backward: reshard every FSDP2 module (the optimizer steps the sharded
    parameters, which now hold the reduced gradients)."""
    for module in step.modules():
        if hasattr(module, "reshard") and hasattr(module, "set_reshard_after_backward"):
            module.reshard()


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
