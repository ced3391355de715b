"""FSDP2 (`torch.distributed.fsdp.fully_shard`): each rank holds a shard of every parameter, its gradient and
its optimizer state; parameters are all-gathered for the forward and backward of each block and gradients
reduce-scattered.

Sharding is per block, then the root: the submodules whose class `dist.fsdp.shard` names (dtrain's own
models name theirs: each linear and convolution layer; ResNet's residual blocks), else the root alone.
With `dist.fsdp.meta_init=true` the model is built on the meta device and only each rank's shards are ever
materialised (`to_empty`, then each module's `reset_parameters`): no rank holds the whole model, but the
random draw is not the unsharded one's. Otherwise the whole model is initialised from the seed first and
sharded after, so its weights match DDP's and any world size's.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterable, Optional

import torch
from torch import nn

from dtrain import world as w
from dtrain.models import blocks_of
from dtrain.strategy.base import Strategy, by_name


class FSDP(Strategy):
    name = "fsdp"
    lockstep_forward = True  # each block's forward all-gathers its parameters

    def __init__(self, world: w.World, shard: Iterable[str], reshard_after_forward: bool,
                 param_dtype: Optional[torch.dtype]):
        super().__init__(world)
        self.shard, self.reshard_after_forward, self.param_dtype = tuple(shard), reshard_after_forward, param_dtype

    def setup(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(self.world.device.type, (self.world.world_size,))
        # bf16 parameters for compute, fp32 gradient reduction (sums of many small bf16 gradients lose bits)
        mp = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32) \
            if self.param_dtype is not None else MixedPrecisionPolicy()
        if self.param_dtype is not None:
            # Norms with running statistics (batch norm) stay fp32, as their fp32 buffers need, each its own
            # FSDP unit whose inputs are cast to fp32 (torchtitan and Lightning keep norms in fp32 too).
            fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
            for norm in [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]:
                fully_shard(norm, mesh=mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=fp32)
        for block in blocks_of(model, self.shard):
            fully_shard(block, mesh=mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=mp)
        fully_shard(model, mesh=mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=mp)
        return model

    def no_sync(self, net: nn.Module, sync: bool) -> ContextManager:
        """Micro-batches of an accumulation step keep their gradients unsharded and unreduced; the step's
        last one reduce-scatters them all once."""
        net.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def clip_grad_norm(self, parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
        norm = nn.utils.clip_grad_norm_(list(parameters), max_norm)  # over every rank's shards
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def model_state_dict(self, model: nn.Module) -> dict:
        """The full (unsharded) state dict, as plain tensors; a collective: every rank calls it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state_dict(self, model: nn.Module, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, by_name(model, optimizer, state),
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


