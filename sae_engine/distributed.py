"""Data parallelism under `torchrun`: each rank sees a shard of the token stream; the SAE stays identical.

The trainer computes losses against *global* statistics (total variance over all ranks' tokens)
and sums gradients across ranks, so N ranks on N shards take exactly the step one process would
take on the concatenated batch. Dead-latent statistics are reduced the same way. Outside
`torchrun` every function here is the identity.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env() -> bool:
    """Join the process group that `torchrun` describes in the environment (gloo on CPU, NCCL on CUDA)."""
    if is_distributed() or "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over ranks, in place; returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def agreed_count(count: int, largest: bool = False) -> int:
    """The smallest `count` over ranks (how many collective steps every rank can take now), or the largest."""
    if not is_distributed():
        return count
    tensor = torch.tensor([count])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if largest else dist.ReduceOp.MIN)
    return int(tensor.item())


def all_gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate every rank's rows (ranks may hold different row counts)."""
    if not is_distributed():
        return tensor
    parts: list[Tensor | None] = [None] * world_size()
    dist.all_gather_object(parts, tensor.cpu())
    return torch.cat([p for p in parts if p is not None]).to(tensor.device)


def sum_gradients(parameters) -> None:
    """Sum the gradients of `parameters` over ranks, flattened into one collective call."""
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
