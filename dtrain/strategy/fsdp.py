"""FSDP2 (`torch.distributed.fsdp.fully_shard`): each rank holds a shard of every parameter, its gradient and
its optimizer state; parameters are all-gathered for the forward and backward of each block and gradients
reduce-scattered.

Sharding is per block, then the root: the submodules whose class `dist.fsdp.shard` (else `model.blocks`)
names (dtrain's own models name theirs: each linear and convolution layer; ResNet's residual blocks), else
the root alone. With `dist.fsdp.meta_init=true` the model is built on the meta device and only each rank's
shards are ever materialised (`to_empty`, then each module's `reset_parameters`): no rank holds the whole
model, but the random draw is not the unsharded one's. Otherwise the whole model is initialised from the
seed first and sharded after, so its weights match DDP's and any world size's.

With dist.tp > 1 the world is a 2-D mesh ("dp", "tp"): tensor parallelism first splits the planned layers
over each group of tp ranks (dtrain/strategy/tensor.py), then activation checkpointing, then FSDP2 shards
over dp, torchtitan's order. The tp ranks of a dp group see the same batches; samplers and metric sums use
the dp coordinate.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager, Iterable

import torch
from torch import nn

from dtrain import models
from dtrain import world as w
from dtrain.config import Config, Precision
from dtrain.models import blocks_of
from dtrain.strategy import tensor
from dtrain.strategy.base import Strategy, by_name


class FSDP(Strategy):
    name = "fsdp"
    describe = "FSDP"
    needs_group = True
    lockstep_forward = True  # each block's forward all-gathers its parameters
    shards_parameters = True
    checkpoint_format = "dcp"  # each rank writes its own shards
    tensor_parallel = True
    options = {"dist.fsdp.shard": None, "dist.fsdp.reshard_after_forward": True, "dist.fsdp.meta_init": False}

    @classmethod
    def check(cls, cfg: Config, others) -> None:
        from dtrain.validate import fail
        super().check(cfg, others)
        if cfg.trainer.compile:
            fail("trainer.compile", True, "not with dist.strategy=fsdp here (compile the blocks yourself, or "
                 "use dist.strategy=ddp)")
        if cfg.dist.tp > 1 and cfg.dist.fsdp.meta_init:
            fail("dist.fsdp.meta_init", True, "not with dist.tp > 1 here: the model is built whole, split by the "
                 "tensor-parallel plan, then sharded")
        if cfg.dist.loss_parallel and (cfg.loss is not None or cfg.trainer.label_smoothing):
            fail("dist.loss_parallel", True, "it computes the task's own cross-entropy on logits split over the "
                 "vocabulary, without label smoothing; not with a loss of your own or trainer.label_smoothing > 0")
        if cfg.trainer.precision == Precision.fp16:
            fail("trainer.precision", "fp16", "dist.strategy=fsdp trains in fp32 or bf16 (bf16 parameters, fp32 "
                 "gradient reduction); fp16 would need a sharded gradient scaler")

    @property
    def blocks(self) -> tuple[str, ...]:
        shard = self.cfg.dist.fsdp.shard
        return tuple(shard) if shard is not None else super().blocks

    @functools.cached_property
    def mesh(self):
        """The device mesh: 1-D over every rank, or 2-D ("dp", "tp") with dist.tp > 1 (rank = dp * tp + tp)."""
        from torch.distributed.device_mesh import init_device_mesh
        tp = self.cfg.dist.tp
        if tp == 1:
            return init_device_mesh(self.world.device.type, (self.world.world_size,))
        return init_device_mesh(self.world.device.type, (self.world.world_size // tp, tp), mesh_dim_names=("dp", "tp"))

    @property
    def dp(self) -> w.DataParallel:
        tp = self.cfg.dist.tp
        if tp == 1:
            return super().dp
        return w.DataParallel(self.world.rank // tp, self.world.world_size // tp, self.mesh.get_group("dp"))

    def setup(self, build: Callable[[], nn.Module], input_format: torch.memory_format) -> tuple[nn.Module, nn.Module]:
        if self.cfg.dist.tp > 1:  # tensor parallel, then activation checkpointing, then FSDP over dp
            model = build()
            if self.cfg.model.init_from:
                models.init_from(model, self.cfg.model.name, self.cfg.model.init_from)
            model.to(self.world.device, memory_format=input_format)
            dist = self.cfg.dist
            tensor.apply(model, self.mesh["tp"], tensor.plan_of(model, dist.tp_plan, dist.tp, dist.sequence_parallel,
                                                                dist.loss_parallel))
            if dist.sequence_parallel:
                tensor.check_sequence_length(model, dist.tp)
            if dist.loss_parallel:
                tensor.enable_loss_parallel()
            self.checkpoint_activations(model)
            return model, self.wrap(model)
        if not self.cfg.dist.fsdp.meta_init:
            return super().setup(build, input_format)
        with torch.device("meta"):
            model = build()
        self.checkpoint_activations(model)
        net = self.wrap(model)
        model.to_empty(device=self.world.device)
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        if self.cfg.model.init_from:
            self.load_model_state_dict(model, models.read_weights(self.cfg.model.name, self.cfg.model.init_from))
        return model, net

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
        mesh = self.mesh["dp"] if self.cfg.dist.tp > 1 else self.mesh
        reshard = self.cfg.dist.fsdp.reshard_after_forward
        if self.precision == Precision.bf16:
            # bf16 parameters for compute, fp32 gradient reduction (sums of many small bf16 gradients lose
            # bits); norms with running statistics (batch norm) stay fp32, as their fp32 buffers need, each
            # its own unit whose inputs are cast to fp32 (torchtitan and Lightning keep norms in fp32 too).
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
            for norm in [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]:
                fully_shard(norm, mesh=mesh, reshard_after_forward=reshard, mp_policy=fp32)
        else:
            mp = MixedPrecisionPolicy()
        for block in blocks_of(model, self.blocks):
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
        for name in ("training_step", "validation_step"):  # the model's own steps unshard as forward does
            if callable(getattr(model, name, None)):
                register_fsdp_forward_method(model, name)
        return model

    def no_sync(self, net: nn.Module, sync: bool) -> ContextManager:
        """Micro-batches of an accumulation step keep their gradients unsharded and unreduced; the step's
        last one reduce-scatters them all once."""
        net.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def clip_grad_norm(self, parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
        if self.cfg.dist.tp > 1:  # parameters on two meshes (2-D and dp), which clip_grad_norm_ cannot stack
            return tensor.clip_grad_norm(parameters, max_norm)
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
