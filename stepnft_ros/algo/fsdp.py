"""Fully sharded data parallel (PyTorch FSDP2, `fully_shard`) for policies too big for one process's memory.

Every rank keeps 1/world_size of each parameter, of its gradient and of the optimizer's state, and
gathers a module's full parameters only while that module runs. A policy is used through methods
(`encode_prefix`, `velocity`) and, for LeRobot's SmolVLA, through layer loops that call a layer's
sub-modules directly rather than the layer itself, so whole transformer layers cannot be the unit
(their forward hook would never fire). The unit is therefore each module that owns parameters
directly (linear layers, norms, embeddings, attention blocks), with everything below it: a module may
read its children's weights directly (torch's MultiheadAttention reads its out_proj's), so a unit's
descendants are never units of their own. The root is the unit of what is left. This is correct
for any network that calls its parameter-owning modules, at the price of many small gathers
(bandwidth, not memory, is what it costs), and coarse where a big module owns a parameter itself.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

ENTRY_METHODS = ('encode_prefix', 'velocity')

# Linear layers on (B, H, d) inputs return views; nothing here modifies a unit's output in place.
warnings.filterwarnings('ignore', message=r'FSDP2-wrapped module .* returned a view tensor')


def shard_policy(model: nn.Module) -> nn.Module:
    """Shard `model` in place over the initialized default process group; returns it.

    Modules whose parameters another module shares (tied weights) stay with the root unit, as do
    parameters a module uses through methods other than its forward (the root gathers everything
    it manages for each entry method). Gradients are summed across ranks, not averaged: the
    trainer scales each rank's loss by that rank's share of the minibatch.
    """
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    units: dict[str, nn.Module] = {}  # the outermost modules that own parameters, in pre-order
    for name, module in model.named_modules():
        inside_unit = any(name.startswith(unit + '.') for unit in units)
        own = list(module.parameters(recurse=False))
        if name and not inside_unit and own and _called_as_module(module) and all(owners[id(p)] == 1 for p in own):
            units[name] = module
    # on the device the weights are on (a GPU machine training on its CPUs keeps a CPU mesh)
    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    for module in units.values():  # sharding replaces the parameters: the units are chosen first
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for method in ENTRY_METHODS:
        register_fsdp_forward_method(model, method)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum
    return model


def _called_as_module(module: nn.Module) -> bool:
    """A module its parent runs through `module(...)`: one whose forward is defined (not a bare holder
    of parameters, such as a normalizer read through its methods)."""
    return type(module).forward is not nn.Module.forward


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on the CPU under the unsharded names; a collective, so every rank calls it
    (rank 0 gets the tensors, the others an empty dict)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)
