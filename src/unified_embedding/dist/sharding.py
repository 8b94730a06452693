"""The whole CTR network under TorchRec's DistributedModelParallel, the unified table sharded row-wise.

Row-wise: rank r holds a contiguous block of the table's rows; every row read is routed
to its rank (an all-to-all of the row ids), pooled there, and the partial sums are
reduce-scattered back to the examples' ranks. The model (cross layers, MLP) is replicated
and trained data-parallel (DDP). The table uses TorchRec's fused kernels (fbgemm's
table-batched embedding): the backward applies the optimizer to the touched rows only, so
no dense gradient of the table ever exists.

On CPU the planner offers no row-wise sharding, so the plan is written by hand
(`construct_module_sharding_plan(..., row_wise())`); on GPU the planner chooses, limited
to row-wise (or table-row-wise) with fused kernels.

Optimizers: fbgemm's fused kernels implement Adam only on GPU; on CPU they offer exact SGD,
exact Adagrad and row-wise Adagrad. `embedding_optimizer` maps a run's optimizer to the
fused one it gets, and says so (run.json records it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import HardwareConfig, KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ShardingEnv, ShardingPlan, ShardingType
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from unified_embedding.dist.modules import TABLE, TorchRecSlotEmbedding
from unified_embedding.network import CTRNetwork

#: Where the EmbeddingBagCollection sits inside a CTRNetwork built by `to_torchrec`.
EBC_PATH = "embedding.ebc"

#: Share of each device's memory the planner leaves to the dense model, activations and buffers.
DENSE_RESERVATION = 0.15

#: Learning rates per optimizer when a run gives none (the single-process trainer's, plus SGD's).
DEFAULT_LR = {"adam": 1e-3, "adagrad": 1e-2, "sgd": 1e-1, "rowwise_adagrad": 1e-2}


@dataclass(frozen=True)
class EmbeddingOptimizer:
    """The fused optimizer of the table, as fbgemm runs it."""

    name: str
    kind: EmbOptimType
    lr: float
    params: dict[str, Any]

    def fused_params(self) -> dict[str, Any]:
        return {"optimizer": self.kind, "learning_rate": self.lr, **self.params}

    def describe(self) -> str:
        extras = "".join(f" {k}={v}" for k, v in self.params.items())
        return f"fbgemm {self.kind.value} lr={self.lr:g}{extras}"


def embedding_optimizer(name: str, lr: float | None, device_type: str, weight_decay: float = 0.0) -> EmbeddingOptimizer:
    """The fused table optimizer for a run's `optimizer` on `device_type`.

    - sgd: exact SGD (what the equivalence test uses: the same update as torch.optim.SGD).
    - adagrad: exact Adagrad with torch's eps, the same update as torch.optim.Adagrad
      (Adagrad leaves rows without gradient alone, so updating touched rows only is exact).
    - adam: fused Adam on GPU, updating touched rows only (as `--sparse` does with
      SparseAdam). fbgemm has no Adam on CPU: there the table gets row-wise Adagrad at
      Adagrad's learning rate, the optimizer TorchRec's own DLRM examples use for tables;
      the dense layers keep Adam.
    - rowwise_adagrad: one accumulator per row (a d-th of Adagrad's state).

    `weight_decay` is fbgemm's L2 mode: added to the gradients of the rows a step touches,
    as the single-process fused update does.
    """
    chosen = _embedding_optimizer(name, lr, device_type)
    if not weight_decay:
        return chosen
    decay = {"weight_decay": weight_decay, "weight_decay_mode": WeightDecayMode.L2}
    return EmbeddingOptimizer(chosen.name, chosen.kind, chosen.lr, {**chosen.params, **decay})


def _embedding_optimizer(name: str, lr: float | None, device_type: str) -> EmbeddingOptimizer:
    if name == "sgd":
        return EmbeddingOptimizer(name, EmbOptimType.EXACT_SGD, lr or DEFAULT_LR["sgd"], {})
    if name == "adagrad":
        return EmbeddingOptimizer(name, EmbOptimType.EXACT_ADAGRAD, lr or DEFAULT_LR["adagrad"], {"eps": 1e-10})
    if name == "rowwise_adagrad" or (name == "adam" and device_type != "cuda"):
        rate = DEFAULT_LR["rowwise_adagrad"] if name == "adam" else (lr or DEFAULT_LR["rowwise_adagrad"])
        return EmbeddingOptimizer(name, EmbOptimType.EXACT_ROWWISE_ADAGRAD, rate, {"eps": 1e-8})
    if name == "adam":
        return EmbeddingOptimizer(
            name, EmbOptimType.ADAM, lr or DEFAULT_LR["adam"], {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
        )
    raise ValueError(f"no fused table optimizer for {name!r}; known: sgd, adagrad, adam, rowwise_adagrad")


def row_wise_plan(network: CTRNetwork, world_size: int, *, local_size: int | None = None,
                  device_type: str = "cpu", sharder: EmbeddingBagCollectionSharder | None = None) -> ShardingPlan:  # fmt: skip
    """The manual plan: the one table split into `world_size` contiguous row blocks, fused kernel."""
    ebc = _ebc(network)
    module_plan: EmbeddingModuleShardingPlan = construct_module_sharding_plan(
        ebc,
        {TABLE: row_wise(compute_kernel=EmbeddingComputeKernel.FUSED.value)},
        sharder=sharder,
        local_size=local_size or world_size,
        world_size=world_size,
        device_type=device_type,
    )
    return ShardingPlan({EBC_PATH: module_plan})


def make_topology(world_size: int, device_type: str, *, local_world_size: int | None = None,
                  hbm_bytes: int | None = None, ddr_bytes: int | None = None) -> Topology:  # fmt: skip
    """The devices the planner plans for (their sizes detected when not given; no device needed to plan)."""
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world_size, local_world_size=local_world_size),
        hardware_config=HardwareConfig(hbm_cap_bytes=hbm_bytes, ddr_cap_bytes=ddr_bytes),
        kernel_config=KernelConfig(compute_device=device_type),
    )


def planner_plan(network: CTRNetwork, sharder: EmbeddingBagCollectionSharder, *, world_size: int,
                 device_type: str, batch_size: int, pg: dist.ProcessGroup | None = None) -> ShardingPlan:  # fmt: skip
    """TorchRec's planner, limited to row-wise sharding of the table with fused kernels."""
    planner = EmbeddingShardingPlanner(
        topology=make_topology(world_size, device_type),
        batch_size=batch_size,
        storage_reservation=FixedPercentageStorageReservation(DENSE_RESERVATION),
        constraints={
            TABLE: ParameterConstraints(
                sharding_types=[ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value],
                compute_kernels=[EmbeddingComputeKernel.FUSED.value],
            )
        },
    )
    if pg is not None:
        return planner.collective_plan(network, [sharder], pg)
    return planner.plan(network, [sharder])


def shard_network(
    network: CTRNetwork,
    *,
    optimizer: str = "adam",
    lr: float | None = None,
    weight_decay: float = 0.0,
    device: torch.device | str | None = None,
    batch_size: int = 1024,
    use_planner: bool | None = None,
) -> tuple[DistributedModelParallel, EmbeddingOptimizer]:
    """`network` (from `to_torchrec`) wrapped in DistributedModelParallel over the default process group.

    The table is sharded row-wise with the fused kernel and its optimizer; the rest is DDP.
    `use_planner` defaults to True on GPU and False on CPU (where the planner refuses
    row-wise). Every rank must pass a network with the same weights (seeded build); each
    rank keeps its block of the table's rows. A table built on the meta device is
    initialised by TorchRec on its shards instead.
    """
    if not dist.is_initialized():
        raise RuntimeError("shard_network needs torch.distributed initialised (run under torch.distributed.run)")
    if not isinstance(network.embedding, TorchRecSlotEmbedding):
        raise TypeError("shard_network needs a network from unified_embedding.dist.to_torchrec")
    device = torch.device(device or "cpu")
    table_optimizer = embedding_optimizer(optimizer, lr, device.type, weight_decay)
    sharder = EmbeddingBagCollectionSharder(fused_params=table_optimizer.fused_params())
    world_size = dist.get_world_size()
    if use_planner is None:
        use_planner = device.type == "cuda"
    if use_planner:
        plan = planner_plan(network, sharder, world_size=world_size, device_type=device.type,
                            batch_size=batch_size, pg=dist.group.WORLD)  # fmt: skip
    else:
        local = int(torch.cuda.device_count()) if device.type == "cuda" else world_size
        plan = row_wise_plan(network, world_size, local_size=local, device_type=device.type, sharder=sharder)
    weights = None if _on_meta(network) else network.state_dict()
    model = DistributedModelParallel(
        network,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=device,
        plan=plan,
        sharders=[sharder],
    )
    if weights is not None:  # DMP initialises fresh shards; give them the network's rows
        model.load_state_dict(weights)
    return model, table_optimizer


def dense_optimizer(model: nn.Module, name: str, lr: float | None) -> KeyedOptimizerWrapper:
    """The optimizer of everything but the fused table (the replicated, DDP-trained part)."""
    rate = lr or DEFAULT_LR[name]
    factories = {
        "adam": lambda params: torch.optim.Adam(params, lr=rate),
        "adagrad": lambda params: torch.optim.Adagrad(params, lr=rate),
        "sgd": lambda params: torch.optim.SGD(params, lr=rate),
        "rowwise_adagrad": lambda params: torch.optim.Adagrad(params, lr=rate),
    }
    if name not in factories:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(factories)}")
    return KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())), factories[name])


def combined_optimizer(model: DistributedModelParallel, name: str, lr: float | None) -> CombinedOptimizer:
    """The fused table optimizer and the dense optimizer as one (one zero_grad, step, state_dict)."""
    return CombinedOptimizer([("table", model.fused_optimizer), ("dense", dense_optimizer(model, name, lr))])


def _on_meta(network: nn.Module) -> bool:
    return any(p.is_meta for p in network.parameters())


def _ebc(network: CTRNetwork) -> nn.Module:
    return network.get_submodule(EBC_PATH)
