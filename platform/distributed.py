"""Process groups for ``torchrun`` (any nproc/nnodes), FSDP2 sharding and the collectives the
training loop needs.

Without torchrun's environment a run is one plain process. Under torchrun every rank joins
one process group (NCCL for CUDA tensors, gloo for CPU tensors) and a model is sharded with
``fully_shard`` unit by unit as the model itself lists them (``shard_units``: the plan lives
next to the model, as torchtitan's per-model ``parallelize``).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

if TYPE_CHECKING:
    from dinoforge.model.meta_arch import ShardUnit

log = logging.getLogger("dinoforge.distributed")

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


class Shardable(Protocol):
    """What sharding knows of a model: the modules to shard, in order (``MetaArch``)."""

    def shard_units(self) -> list[ShardUnit]: ...


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_world(timeout_s: float = 1800.0) -> World:
    """Joins torchrun's process group when launched by it; otherwise a single process."""
    if "RANK" not in os.environ or dist.is_initialized():
        if dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
            return World(rank, world_size, local_rank, _device(local_rank))
        return World(device=_device(0))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _device(local_rank)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # Each restart attempt gets its own key space in the agent's store: reusing the keys of a
        # crashed attempt made gloo's connectFullMesh fail in half of the restarts we measured on
        # torch 2.13 (ENVIRONMENT.md), the prefix made all of them succeed.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        base = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
        )
        store = dist.PrefixStore(f"/dinoforge/attempt_{attempt}", base)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    log.info("rank %d/%d joined (%s, %s)", rank, world_size, backend, device)
    return World(rank, world_size, local_rank, device)


def close_world() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: Shardable, world: World, precision: str) -> None:
    """FSDP2 over every rank, unit by unit as the model lists them (``shard_units``: for the
    DINO models each block, then each backbone and head, of every branch alike, so that the EMA
    runs shard by shard). Paper/official recipe: compute in ``precision``, fp32 master weights,
    gradients reduced in ``precision`` except where a unit asks for fp32 (the heads)."""
    compute = PRECISIONS[precision]
    mesh = init_device_mesh(world.device.type, (world.world_size,))
    policies = {
        False: MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=compute),
        True: MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32),
    }
    for unit in model.shard_units():
        policy = policies[unit.reduce_in_fp32]
        fully_shard(unit.module, mesh=mesh, mp_policy=policy, reshard_after_forward=unit.reshard_after_forward)
        for method in unit.forward_methods:
            register_fsdp_forward_method(unit.module, method)


def global_mean(values: dict[str, torch.Tensor], world: World) -> dict[str, float]:
    """Each scalar tensor averaged over all ranks (one all-reduce), as floats."""
    if not world.distributed:
        return {k: v.item() for k, v in values.items()}
    stacked = torch.stack([v.float() for v in values.values()])
    dist.all_reduce(stacked)
    return {k: (v / world.world_size).item() for k, v in zip(values, stacked)}


def gather_lists(items: list, world: World) -> list:
    """Every rank's ``items`` (picklable), concatenated in rank order, on every rank."""
    if not world.distributed:
        return items
    gathered: list[list] = [[] for _ in range(world.world_size)]
    dist.all_gather_object(gathered, items)
    return [item for rank_items in gathered for item in rank_items]
