"""Bytes all-reduced per optimiser step by each mode, measured in 2- and 4-process CPU (gloo) runs.

Every rank runs the plain DDP loop of ``examples/fabric_multitask.py``'s kind with the benchmark MLP of
``benchmarks/mtl_overhead.py`` (784→1024→1024→1024→512, K linear heads). DDP's own gradient all-reduce is counted by a
communication hook on the DDP module (the buckets it really sends); the engine counts what it adds
(``GradientEngine.bytes_all_reduced``). The counts feed the step-time model in ``benchmarks/scaling.md``.

    python benchmarks/scaling.py            # prints a markdown table
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
            opt = torch.optim.SGD(module.parameters(), lr=1e-3)
            for _ in range(steps):
                x = torch.randn(32, 784)
                y = torch.randint(0, 10, (32, k))
                z, outs = ddp(x)
                losses = {f"t{i}": F.cross_entropy(o, y[:, i]) for i, o in enumerate(outs)}
                opt.zero_grad()
                engine.backward(losses, module=module, shared=z)
                engine.apply()
                opt.step()
            shared = sum(p.numel() for p in module.trunk.parameters())
            total = sum(p.numel() for p in module.parameters())
            name = mode + (" (rank-local)" if rank_local else "")
            rows.append((world, k, name, total, shared, state["bytes"] / steps, engine.bytes_all_reduced / steps))
    if rank == 0:
        torch.save(rows, f"{out}/rows.pt")
    dist.destroy_process_group()


def measure(world: int, tasks: list[int], steps: int) -> list[tuple]:
    with tempfile.TemporaryDirectory() as out:
        port = 29700 + os.getpid() % 200 + world
        mp.start_processes(_worker, args=(world, port, out, tasks, steps), nprocs=world, start_method="spawn")
        return torch.load(f"{out}/rows.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--tasks", default="2,4")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    tasks = [int(t) for t in args.tasks.split(",")]
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
