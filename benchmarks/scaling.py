"""Bytes all-reduced per optimiser step by each mode, measured in 2- and 4-process CPU (gloo) runs.

Every rank runs the plain DDP loop of ``examples/fabric_multitask.py``'s kind with the benchmark MLP of
``benchmarks/mtl_overhead.py`` (784→1024→1024→1024→512, K linear heads). DDP's own gradient all-reduce is counted by a
communication hook on the DDP module (the buckets it really sends); the engine counts what it adds
(``GradientEngine.bytes_all_reduced``). The counts feed the step-time model in ``benchmarks/scaling.md``.

``--fsdp2`` runs the same net under FSDP2 (``fully_shard`` on every trunk layer and the root) instead, and counts
FSDP2's own all-gathers and reduce-scatters (full unsharded sizes, by wrapping ``torch.distributed``'s
``all_gather_single`` / ``reduce_scatter_single``, which FSDP2 calls) for a plain step and for both modes.

    python benchmarks/scaling.py            # prints a markdown table
    python benchmarks/scaling.py --fsdp2    # the FSDP2 table
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from mtl_overhead import Net  # the benchmark MLP (this folder is on sys.path when run as a script)
from torch import nn

import lightning_mtl as mtl
from lightning_mtl.engine import GradientEngine


def _count_hook(state, bucket):  # no annotations: DDP checks them literally
    buf = bucket.buffer()
    state["bytes"] += buf.numel() * buf.element_size()
    fut = dist.all_reduce(buf.div_(dist.get_world_size()), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _train(net: nn.Module, module: nn.Module, engine: GradientEngine | None, k: int, steps: int) -> None:
    """``steps`` SGD steps on random data through ``net`` (the DDP wrapper or the module); ``engine=None``: plain."""
    opt = torch.optim.SGD(module.parameters(), lr=1e-3)
    for _ in range(steps):
        x = torch.randn(32, 784)
        y = torch.randint(0, 10, (32, k))
        z, outs = net(x)
        losses = {f"t{i}": F.cross_entropy(o, y[:, i]) for i, o in enumerate(outs)}
        opt.zero_grad()
        if engine is None:
            sum(losses.values()).backward()
        else:
            engine.backward(losses, module=module, shared=z)
            engine.apply()
        opt.step()


def _worker(rank: int, world: int, port: int, out: str, tasks: list[int], steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rows = []
    for k in tasks:
        for mode, rank_local in (("parameter", False), ("representation", False), ("representation", True)):
            torch.manual_seed(0)
            module = Net(k)
            ddp = nn.parallel.DistributedDataParallel(module)
            state = {"bytes": 0}
            ddp.register_comm_hook(state, _count_hook)
            engine = GradientEngine(mtl.MGDA(), mode, rank_local=rank_local)
            _train(ddp, module, engine, k, steps)
            shared = sum(p.numel() for p in module.trunk.parameters())
            total = sum(p.numel() for p in module.parameters())
            name = mode + (" (rank-local)" if rank_local else "")
            rows.append((world, k, name, total, shared, state["bytes"] / steps, engine.bytes_all_reduced / steps))
    if rank == 0:
        torch.save(rows, f"{out}/rows.pt")
    dist.destroy_process_group()


def _count_collectives(counts: dict[str, int]) -> None:
    """Wrap the two collectives FSDP2 uses so that each adds the bytes of its full (unsharded) buffer to ``counts``."""
    gather, scatter = dist.all_gather_single, dist.reduce_scatter_single

    def all_gather_single(output, input, *args, **kwargs):
        counts["all_gather"] += output.numel() * output.element_size()
        return gather(output, input, *args, **kwargs)

    def reduce_scatter_single(output, input, *args, **kwargs):
        counts["reduce_scatter"] += input.numel() * input.element_size()
        return scatter(output, input, *args, **kwargs)

    dist.all_gather_single, dist.reduce_scatter_single = all_gather_single, reduce_scatter_single


def _fsdp2_worker(rank: int, world: int, port: int, out: str, tasks: list[int], steps: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    counts = {"all_gather": 0, "reduce_scatter": 0}
    _count_collectives(counts)
    rows = []
    for k in tasks:
        for mode in ("plain", "parameter", "representation"):
            torch.manual_seed(0)
            module = Net(k)
            for layer in module.trunk:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(module, mesh=mesh)
            engine = None if mode == "plain" else GradientEngine(mtl.MGDA(), mode)
            counts.update(all_gather=0, reduce_scatter=0)
            _train(module, module, engine, k, steps)
            ours = 0 if engine is None else engine.bytes_all_reduced
            rows.append((world, k, mode, counts["all_gather"] / steps, counts["reduce_scatter"] / steps, ours / steps))
    if rank == 0:
        torch.save(rows, f"{out}/rows.pt")
    dist.destroy_process_group()


def measure(world: int, tasks: list[int], steps: int, fsdp2: bool = False) -> list[tuple]:
    with tempfile.TemporaryDirectory() as out:
        port = 29700 + os.getpid() % 200 + world
        worker = _fsdp2_worker if fsdp2 else _worker
        mp.start_processes(worker, args=(world, port, out, tasks, steps), nprocs=world, start_method="spawn")
        return torch.load(f"{out}/rows.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--tasks", default="2,4")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--fsdp2", action="store_true", help="count FSDP2's collectives instead of DDP's")
    args = parser.parse_args()
    tasks = [int(t) for t in args.tasks.split(",")]
    if args.fsdp2:
        print("| processes | K | step | FSDP2 all-gather / step | FSDP2 reduce-scatter / step | engine all-reduce")
        print("|---|---|---|---|---|---")
        for world in (int(w) for w in args.worlds.split(",")):
            for w, k, mode, gathered, scattered, ours in measure(world, tasks, args.steps, fsdp2=True):
                mib = f"{gathered / 2**20:.2f} MiB | {scattered / 2**20:.2f} MiB"
                print(f"| {w} | {k} | {mode} | {mib} | {ours:,.0f} B", flush=True)
        return
    print(
        "| processes | K | mode | parameters (shared) | DDP gradient all-reduce / step | engine all-reduce / step | "
        "engine / DDP |"
    )
    print("|---|---|---|---|---|---|---|")
    for world in (int(w) for w in args.worlds.split(",")):
        for w, k, mode, total, shared, ddp_bytes, ours in measure(world, tasks, args.steps):
            print(
                f"| {w} | {k} | {mode} | {total:,} ({shared:,}) | {ddp_bytes / 2**20:.2f} MiB | "
                f"{ours / 2**20:.4f} MiB ({ours:,.0f} B) | {ours / ddp_bytes:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
