"""`ue plan`: how TorchRec would shard a unified table of R rows x D across W devices, on paper.

The table is built on the meta device (no memory), so a plan for a table far larger than
this machine (2e9 rows x 64 on 64 GPUs: 512 GB of float32) takes a second. On `--device
cuda` (the default) TorchRec's planner chooses, limited to row-wise sharding with the fused
kernel (`--sharding table_row_wise` also allows TorchRec's host-local variant); no GPU is
needed to plan, since the planner only models the devices. On `--device cpu`, where the
planner offers no row-wise sharding, the plan is the manual one training uses on CPU.

Per rank it reports the rows held, the bytes of those rows (these add up to the table),
the fused optimizer's state for them, and, on cuda, the planner's own estimate of device
(HBM) and host (DDR) memory: rows, optimizer state and input/output buffers. A table that
does not fit in the GPUs' memory gets the planner's explanation; `--uvm` lets rows live in
host memory behind a GPU cache.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from unified_embedding.dist import require_torchrec

GIB = 1 << 30
#: Optimizer state per row, in floats, for a row of width d (fbgemm's fused optimizers).
STATE_FLOATS = {
    "exact_sgd": lambda d: 0,
    "exact_adagrad": lambda d: d,
    "exact_row_wise_adagrad": lambda d: 1,
    "adam": lambda d: 2 * d,
}


@dataclass
class RankShare:
    rank: int
    row_start: int
    rows: int
    table_bytes: int
    optimizer_bytes: int
    planner_hbm_bytes: int | None = None
    planner_ddr_bytes: int | None = None


@dataclass
class Plan:
    rows: int
    dim: int
    features: int
    probes: int
    world_size: int
    device: str
    sharding_type: str
    compute_kernel: str
    optimizer: str
    shares: list[RankShare]

    @property
    def table_bytes(self) -> int:
        return self.rows * self.dim * 4

    def check(self) -> None:
        """The shares cover the table exactly: contiguous row blocks whose rows and bytes add up."""
        total_rows = sum(s.rows for s in self.shares)
        if total_rows != self.rows or sum(s.table_bytes for s in self.shares) != self.table_bytes:
            raise AssertionError(f"the plan holds {total_rows:,} rows of a {self.rows:,}-row table")
        start = 0
        for share in sorted((s for s in self.shares if s.rows), key=lambda s: s.row_start):
            if share.row_start != start:
                raise AssertionError(f"rank {share.rank}'s rows start at {share.row_start:,}, expected {start:,}")
            start += share.rows

    def to_dict(self) -> dict:
        return asdict(self) | {"table_bytes": self.table_bytes}


def table_module(rows: int, dim: int, features: int, probes: int):
    """A unified table as TorchRec sees it, on the meta device: one table, one feature key per (feature, probe)."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from unified_embedding.dist.modules import SLOT_SEPARATOR, TABLE

    keys = [f"feature{i}{SLOT_SEPARATOR}{j}" for i in range(features) for j in range(probes)]
    config = EmbeddingBagConfig(name=TABLE, embedding_dim=dim, num_embeddings=rows, feature_names=keys)
    return EmbeddingBagCollection(tables=[config], device=torch.device("meta"))


def make_plan(
    rows: int,
    dim: int,
    features: int,
    world_size: int,
    *,
    probes: int = 2,
    device: str = "cuda",
    local_world_size: int = 8,
    hbm_gib: float = 80.0,
    ddr_gib: float = 1024.0,
    batch_size: int = 8192,
    optimizer: str = "adam",
    sharding: Sequence[str] = ("row_wise",),
    uvm: bool = False,
) -> Plan:
    """The sharding plan of a rows x dim unified table over world_size devices, with per-rank memory."""
    require_torchrec()
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.planner.types import PlannerError
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
    from torchrec.distributed.types import ShardingType
    from torchrec.optim import RowWiseAdagrad, apply_optimizer_in_backward

    from unified_embedding.dist.modules import TABLE
    from unified_embedding.dist.sharding import DENSE_RESERVATION, embedding_optimizer, make_topology

    # The optimizer class TorchRec's planner reads to size a fused optimizer's state.
    optimizer_classes = {
        "exact_sgd": torch.optim.SGD,
        "exact_adagrad": torch.optim.Adagrad,
        "exact_row_wise_adagrad": RowWiseAdagrad,
        "adam": torch.optim.Adam,
    }
    for name, value in (
        ("rows", rows),
        ("dim", dim),
        ("features", features),
        ("world_size", world_size),
        ("probes", probes),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    table_optimizer = embedding_optimizer(optimizer, None, device)
    state_floats = STATE_FLOATS.get(table_optimizer.kind.value, lambda d: 0)(dim)
    module = table_module(rows, dim, features, probes)
    # The planner sizes optimizer state from the optimizer applied in backward (TorchRec's way to name it).
    apply_optimizer_in_backward(
        optimizer_classes[table_optimizer.kind.value], module.parameters(), {"lr": table_optimizer.lr}
    )
    sharder = EmbeddingBagCollectionSharder(fused_params=table_optimizer.fused_params())
    estimates: dict[int, tuple[int, int]] = {}
    if device == "cuda":
        types = [ShardingType(s).value for s in sharding]
        kernels = [EmbeddingComputeKernel.FUSED.value]
        if uvm:  # rows may also live in host memory, cached in (or read through to) the GPU
            kernels += [EmbeddingComputeKernel.FUSED_UVM_CACHING.value, EmbeddingComputeKernel.FUSED_UVM.value]
        planner = EmbeddingShardingPlanner(
            topology=make_topology(
                world_size, "cuda", local_world_size=min(local_world_size, world_size),
                hbm_bytes=int(hbm_gib * GIB), ddr_bytes=int(ddr_gib * GIB),
            ),
            batch_size=batch_size,
            storage_reservation=FixedPercentageStorageReservation(DENSE_RESERVATION),
            constraints={TABLE: ParameterConstraints(sharding_types=types, compute_kernels=kernels)},
        )  # fmt: skip
        try:
            parameter_sharding = planner.plan(module, [sharder]).plan[""][TABLE]
        except PlannerError as error:
            raise ValueError(f"TorchRec's planner found no plan: {error}") from None
        for option in getattr(planner, "_best_plan", None) or []:  # the planner's own memory estimates
            for shard in option.shards:
                if shard.rank is not None and shard.storage is not None:
                    hbm, ddr = estimates.get(shard.rank, (0, 0))
                    estimates[shard.rank] = (hbm + shard.storage.hbm, ddr + shard.storage.ddr)
    else:
        parameter_sharding = construct_module_sharding_plan(
            module, {TABLE: row_wise(compute_kernel=EmbeddingComputeKernel.FUSED.value)}, sharder=sharder,
            local_size=world_size, world_size=world_size, device_type="cpu",
        )[TABLE]  # fmt: skip
    held: dict[int, list[int]] = {r: [0, 0] for r in range(world_size)}  # rank -> [row_start, rows]
    for shard in parameter_sharding.sharding_spec.shards:
        rank = shard.placement.rank()
        if shard.shard_sizes[1] != dim:
            raise ValueError(f"the plan splits columns ({parameter_sharding.sharding_type}); expected whole rows")
        if held[rank][1] == 0:
            held[rank][0] = shard.shard_offsets[0]
        held[rank][1] += shard.shard_sizes[0]
    shares = []
    for rank, (start, count) in held.items():
        hbm_ddr = estimates.get(rank)
        shares.append(RankShare(
            rank=rank, row_start=start, rows=count, table_bytes=count * dim * 4,
            optimizer_bytes=count * state_floats * 4,
            planner_hbm_bytes=None if hbm_ddr is None else hbm_ddr[0],
            planner_ddr_bytes=None if hbm_ddr is None else hbm_ddr[1],
        ))  # fmt: skip
    plan = Plan(
        rows=rows, dim=dim, features=features, probes=probes, world_size=world_size, device=device,
        sharding_type=parameter_sharding.sharding_type, compute_kernel=parameter_sharding.compute_kernel,
        optimizer=table_optimizer.describe(), shares=shares,
    )  # fmt: skip
    plan.check()
    return plan


def format_plan(plan: Plan) -> str:
    """The plan as a table: one line per rank, then the totals (which equal the table)."""
    estimated = any(s.planner_hbm_bytes is not None for s in plan.shares)
    lines = [
        (
            f"unified table: {plan.rows:,} rows x {plan.dim} float32 = {plan.table_bytes / GIB:,.2f} GiB; "
            f"{plan.features} features x {plan.probes} probes = {plan.features * plan.probes} TorchRec feature keys"
        ),
        (
            f"plan: {plan.sharding_type}, kernel {plan.compute_kernel}, {plan.world_size} x {plan.device}; "
            f"table optimizer {plan.optimizer}"
        ),
        "",
    ]
    header = f"{'rank':>5}  {'first row':>15}  {'rows':>15}  {'table GiB':>10}  {'optim GiB':>10}"
    if estimated:
        header += f"  {'planner HBM GiB':>15}  {'planner DDR GiB':>15}"
    lines += [header, "-" * len(header)]

    def row(label: str, start: str, rows: int, table: int, optim: int, hbm: int | None, ddr: int | None) -> str:
        text = f"{label:>5}  {start:>15}  {rows:>15,}  {table / GIB:>10.3f}  {optim / GIB:>10.3f}"
        if estimated:
            text += (
                f"  {'' if hbm is None else f'{hbm / GIB:.3f}':>15}  {'' if ddr is None else f'{ddr / GIB:.3f}':>15}"
            )
        return text

    for s in plan.shares:
        start = f"{s.row_start:,}" if s.rows else "-"
        lines.append(
            row(str(s.rank), start, s.rows, s.table_bytes, s.optimizer_bytes, s.planner_hbm_bytes, s.planner_ddr_bytes)
        )
    lines.append("-" * len(header))
    total_hbm = sum(s.planner_hbm_bytes or 0 for s in plan.shares) if estimated else None
    total_ddr = sum(s.planner_ddr_bytes or 0 for s in plan.shares) if estimated else None
    lines.append(row("total", "", sum(s.rows for s in plan.shares), sum(s.table_bytes for s in plan.shares),
                     sum(s.optimizer_bytes for s in plan.shares), total_hbm, total_ddr))  # fmt: skip
    lines.append(
        f"the ranks hold {sum(s.rows for s in plan.shares):,} of {plan.rows:,} rows "
        f"({sum(s.table_bytes for s in plan.shares):,} of {plan.table_bytes:,} table bytes)"
    )
    if estimated:
        lines.append("planner HBM/DDR: TorchRec's estimate per device (rows, optimizer state, input/output buffers)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`ue plan`'s flags (the CLI adds these to its `plan` subcommand)."""
    parser.add_argument("--rows", type=_count, required=True, help="rows of the unified table (2e9 is fine)")
    parser.add_argument("--dim", type=int, required=True, help="width of a row (the chunk dimension)")
    parser.add_argument("--features", type=int, required=True, help="sparse features reading the table")
    parser.add_argument("--world-size", type=int, required=True, help="devices (ranks) to shard across")
    parser.add_argument("--probes", type=int, default=2, help="probes per feature (feature keys = features x probes)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="plan for GPUs (TorchRec's planner; no GPU needed to plan) or CPU ranks (the manual row-wise plan)")  # fmt: skip
    parser.add_argument("--local-world-size", type=int, default=8, help="devices per host (cuda)")
    parser.add_argument("--hbm-gib", type=float, default=80.0, help="memory per GPU (cuda)")
    parser.add_argument("--ddr-gib", type=float, default=1024.0, help="host memory per host (cuda)")
    parser.add_argument("--batch-size", type=int, default=8192, help="per-rank batch size the planner assumes")
    parser.add_argument("--optimizer", choices=["adam", "adagrad", "rowwise_adagrad", "sgd"], default="adam",
                        help="training optimizer (sets the fused table optimizer's state size)")  # fmt: skip
    parser.add_argument("--sharding", default="row_wise",
                        help="comma-separated sharding types the planner may use: row_wise, table_row_wise")  # fmt: skip
    parser.add_argument("--uvm", action="store_true",
                        help="let rows live in host memory too (fbgemm's UVM kernels, with a GPU cache); cuda only")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    """`ue plan`: print the plan (a table, or JSON with --json)."""
    plan = make_plan(
        args.rows, args.dim, args.features, args.world_size, probes=args.probes, device=args.device,
        local_world_size=args.local_world_size, hbm_gib=args.hbm_gib, ddr_gib=args.ddr_gib,
        batch_size=args.batch_size, optimizer=args.optimizer,
        sharding=[s.strip() for s in args.sharding.split(",") if s.strip()], uvm=args.uvm,
    )  # fmt: skip
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def _count(text: str) -> int:
    """An integer count that may be written 2e9 or 2_000_000_000."""
    value = float(text.replace("_", ""))
    if value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number of rows, got {text!r}")
    return int(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ue plan", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
