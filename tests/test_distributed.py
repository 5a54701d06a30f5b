"""Several processes (gloo, CPU): DDP inside Lightning (ddp_spawn), DDP in a plain loop, and the Fabric example.

Contract: after every step all ranks hold identical parameters, equal (float64) to a single-process run on the
concatenated batch, for every weighting, in both modes.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler

import lightning_mtl as mtl
from lightning_mtl.callbacks import MultiTaskGradient
from lightning_mtl.engine import GradientEngine
from tests._distributed import shut_down
from tests._mtl_models import TwoHeads, loader, make_data, trainer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# Several spawns in one test process: hand tensors over through files rather than inherited descriptors, which
# a later spawn could otherwise fail to reopen ("unable to resize file").
mp.set_sharing_strategy("file_system")


class SaveParams(L.Callback):
    """Every rank writes its final parameters to ``out/{prefix}rank{r}.pt``."""

    def __init__(self, out: Path, prefix: str = "") -> None:
        self.out, self.prefix = out, prefix

    def on_train_end(self, trainer, pl_module):
        params = [p.detach().cpu() for p in pl_module.parameters()]
        torch.save(params, self.out / f"{self.prefix}rank{trainer.global_rank}.pt")


class InOrder(L.LightningDataModule):
    """Rank r takes samples r, r+W, ... in order (Lightning's own distributed sampler always shuffles training
    data), so that a DDP step sees exactly the samples of one larger single-process batch."""

    def __init__(self, ds, batch_size: int) -> None:
        super().__init__()
        self.ds, self.batch_size = ds, batch_size

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.ds, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.ds, batch_size=self.batch_size, sampler=sampler)


def _ddp_trainer(root: Path, callbacks: list, **kw) -> L.Trainer:
    return trainer(
        strategy="ddp_spawn",
        devices=2,
        precision="64-true",
        callbacks=callbacks,
        default_root_dir=root,
        use_distributed_sampler=False,
        **kw,
    )


def _ddp_fit(tmp_path: Path, model, ds, callback, batch_size: int, ckpt_path: str | None = None, **kw):
    out = tmp_path / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    _ddp_trainer(tmp_path, [callback, SaveParams(out)], **kw).fit(model, InOrder(ds, batch_size), ckpt_path=ckpt_path)
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    for a, b in zip(r0, r1):
        assert torch.equal(a, b), "ranks diverged"
    return r0


@pytest.mark.parametrize("mode", ["parameter", "representation"])
def test_lightning_ddp_equals_one_process_on_the_concatenated_batch(tmp_path, mode):
    ds = make_data(n=80, dtype=torch.float64)  # 5 steps of 2 x 8
    torch.manual_seed(0)
    model = TwoHeads().double()
    ranks = _ddp_fit(tmp_path, copy.deepcopy(model), ds, MultiTaskGradient(mtl.MGDA(), mode=mode), 8, max_epochs=1)
    single = copy.deepcopy(model)
    trainer(precision="64-true", callbacks=[MultiTaskGradient(mtl.MGDA(), mode=mode)]).fit(single, loader(ds, 16))
    for a, b in zip(ranks, single.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6)
    assert not torch.equal(ranks[0], model.trunk[0].weight.detach())  # it did train


def test_lightning_ddp_with_accumulation_and_resume(tmp_path):
    """accumulate_grad_batches=2 under DDP: ranks identical and equal to one process with the 4x batch (the
    documented parameter-mode semantics); a DDP run resumed from a checkpoint continues like an uninterrupted one.
    PCGrad draws random orders and Adam has state, so both must come back from the checkpoint."""
    ds = make_data(n=64, dtype=torch.float64)
    torch.manual_seed(0)
    model = TwoHeads(optimizer="adam", lr=0.01).double()
    kw = dict(max_epochs=2, accumulate_grad_batches=2)
    full = _ddp_fit(tmp_path / "full", copy.deepcopy(model), ds, MultiTaskGradient(mtl.PCGrad(seed=2)), 8, **kw)
    single = copy.deepcopy(model)
    trainer(precision="64-true", max_epochs=2, callbacks=[MultiTaskGradient(mtl.PCGrad(seed=2))]).fit(
        single, loader(ds, 32)
    )
    for a, b in zip(full, single.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6)

    first = tmp_path / "first"
    _ddp_trainer(
        first,
        [MultiTaskGradient(mtl.PCGrad(seed=2))],
        max_epochs=1,
        accumulate_grad_batches=2,
        enable_checkpointing=True,
    ).fit(copy.deepcopy(model), InOrder(ds, 8))
    ckpt = next(first.rglob("*.ckpt"))
    resumed = _ddp_fit(
        tmp_path / "resumed",
        copy.deepcopy(model),
        ds,
        MultiTaskGradient(mtl.PCGrad(seed=2)),
        8,
        ckpt_path=str(ckpt),
        **kw,
    )
    for a, b in zip(resumed, full):
        assert torch.equal(a, b)


DDP_CONFIGS = [f"{m}:{w}:1" for m in ("parameter", "representation") for w in ("MGDA", "GradNormalize")]
DDP_CONFIGS.append("parameter:MGDA:2")  # accumulation


def check_ddp_script(out: Path, accelerator: str, configs: list[str], timeout: float = 300) -> None:
    """Run tests/scripts/ddp_fit.py (``strategy="ddp"``, 2 processes) for ``configs``; assert that it was Lightning's
    subprocess launcher with two processes, that both ranks hold identical parameters, and that these equal (1e-6,
    float64) one process on ``accelerator`` with the concatenated batch (the same steps, twice the batch)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = ROOT / "tests" / "scripts" / "ddp_fit.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(out), accelerator, *configs],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    launch = [(out / f"launch.rank{r}.txt").read_text().split() for r in (0, 1)]
    assert launch[0][:3] == ["DDPStrategy", "_SubprocessScriptLauncher", "world_size=2"], launch[0]
    assert launch[1][2] == "world_size=2" and launch[0][3] != launch[1][3], launch  # two processes
    ds = make_data(n=80, dtype=torch.float64)
    for config in configs:
        mode, name, accumulate = config.split(":")
        r0, r1 = (torch.load(out / f"{config.replace(':', '_')}.rank{r}.pt") for r in (0, 1))
        torch.manual_seed(0)
        single = TwoHeads().double()
        initial = [p.detach().clone() for p in single.parameters()]
        callback = MultiTaskGradient(WEIGHTINGS[name](), mode=mode)
        trainer(
            accelerator=accelerator,
            precision="64-true",
            deterministic=accelerator == "cpu",
            accumulate_grad_batches=int(accumulate),
            callbacks=[callback],
        ).fit(single, loader(ds, 16))
        for a, b, c in zip(r0, r1, single.parameters(), strict=True):
            assert torch.equal(a, b), f"{config}: ranks diverged"
            torch.testing.assert_close(a, c.detach().cpu(), rtol=0, atol=1e-6, msg=config)
        assert not torch.equal(r0[0], initial[0].cpu()), f"{config}: did not train"


def test_lightning_ddp_subprocess_launcher_equals_one_process(tmp_path):
    """``strategy="ddp"`` (Lightning's default for several devices: it re-runs the script for the other ranks), gloo
    on CPU: MGDA and GradNormalize in both modes, and MGDA with accumulate_grad_batches=2, give identical parameters
    on both ranks, equal to one process on the concatenated batch. Run as a script (tests/scripts/ddp_fit.py): inside
    pytest the launcher would re-launch pytest."""
    check_ddp_script(tmp_path, "cpu", DDP_CONFIGS)


# --- every weighting, both modes, in one 2-process plain DDP loop --------------------------------------------------
WEIGHTINGS = {
    "Mean": mtl.Mean,
    "GradNormalize": mtl.GradNormalize,
    "MGDA": mtl.MGDA,
    "PrimaryAuxiliary": lambda: mtl.PrimaryAuxiliary("t0"),
}


def _loop(module: TwoHeads, ds, engine: GradientEngine, rank: int, world: int, steps: int, batch: int):
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    net = module if world == 1 else torch.nn.parallel.DistributedDataParallel(module)
    for step in range(steps):
        idx = torch.arange(step * batch * world, (step + 1) * batch * world)[rank::world]
        x, y = ds.tensors[0][idx], ds.tensors[1][idx]
        z, outs = net(x)  # through the DDP wrapper, so that its reducer is prepared as in real use
        losses = {n: torch.nn.functional.mse_loss(o, y[:, i]) for i, (n, o) in enumerate(zip(module.names, outs))}
        opt.zero_grad()
        engine.backward(losses, module=module, shared=z)
        engine.apply()
        opt.step()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    ds = make_data(n=80, k=3, dtype=torch.float64)
    results = {}
    for mode in ("parameter", "representation"):
        for name, make in WEIGHTINGS.items():
            torch.manual_seed(0)
            module = TwoHeads(k=3).double()
            _loop(module, ds, GradientEngine(make(), mode), rank, world, steps=5, batch=8)
            results[(mode, name)] = [p.detach().clone() for p in module.parameters()]
    torch.save(results, f"{out}/loop{rank}.pt")
    shut_down()


def test_plain_ddp_loop_every_weighting_both_modes(tmp_path):
    port = 29500 + os.getpid() % 1000
    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    r0, r1 = torch.load(tmp_path / "loop0.pt"), torch.load(tmp_path / "loop1.pt")
    ds = make_data(n=80, k=3, dtype=torch.float64)
    for (mode, name), params in r0.items():
        torch.manual_seed(0)
        module = TwoHeads(k=3).double()
        _loop(module, ds, GradientEngine(WEIGHTINGS[name](), mode), 0, 1, steps=5, batch=16)
        for a, b, c in zip(params, r1[(mode, name)], module.parameters()):
            assert torch.equal(a, b), f"{mode}/{name}: ranks diverged"
            torch.testing.assert_close(a, c.detach(), rtol=0, atol=1e-6, msg=f"{mode}/{name}")


@pytest.mark.parametrize(
    "example, args, expected",
    [
        ("fabric_multitask.py", ["--steps", "6"], ["identical parameters on all 2 ranks"]),
        (
            "fabric_ddpm.py",
            ["--steps", "3", "--batch-size", "16", "--buckets", "4", "--gradnormalize", "--output-dir", "out"],
            ["identical weights on all ranks: True", "sample grid (EMA weights):"],
        ),
    ],
)
def test_fabric_example_under_fabric_run(tmp_path, example, args, expected):
    """`fabric run --accelerator cpu --devices 2 examples/<example>` ends with identical weights, and exits cleanly."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    fabric = Path(sys.executable).with_name("fabric")  # the console script installed with lightning
    assert fabric.exists(), f"no `fabric` command beside {sys.executable}"
    cmd = [str(fabric), "run", "--accelerator", "cpu", "--devices", "2", str(ROOT / "examples" / example), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for line in expected:
        assert line in proc.stdout
    if example == "fabric_ddpm.py":
        assert (tmp_path / "out" / "samples.png").is_file()


def fsdp2_hidden(k: int) -> int:
    """Hidden width of the FSDP2 runs: 7 for K = 3, so that the two ranks' shards are uneven (4 and 3 rows)."""
    return 7 if k == 3 else 8


FSDP2_CONFIGS = [f"parameter:{name}:1:2:" for name in WEIGHTINGS] + [
    "parameter:MGDA:2:2:",  # accumulation
    "parameter:MGDA:1:3:",  # two task backwards per step, uneven shards
    "parameter:GradNormalize:1:3:exact",  # subtract_last=False
    "representation:MGDA:1:2:",
    "parameter:MGDA:1:1:",  # one task: training left as it is, the gradient norm read from the DTensor shards
]
FSDP2_ERRORS = {"parameter:MGDA:1:2:nosync": "gradient sync is off", "parameter:MGDA:1:2:unsharded": "fully_shard"}


def test_fsdp2_equals_one_process(tmp_path):
    """ModelParallelStrategy (FSDP2, fully_shard) on 2 processes: every weighting in parameter mode, with
    accumulate_grad_batches=2, with K=3 on uneven shards, with subtract_last=False, with K=1 (nothing weighted; the
    logged norm is the global one), and representation mode give the
    parameters of one process on the concatenated batch (so of the DDP runs above). With FSDP2's gradient sync off,
    or without fully_shard, parameter mode stops with a message. Run as a script: the strategy re-launches it."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = ROOT / "tests" / "scripts" / "fsdp2_fit.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), *FSDP2_CONFIGS, *FSDP2_ERRORS],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for config in FSDP2_CONFIGS:
        mode, name, accumulate, k, variant = config.split(":")
        # full_tensor() gathers, so both ranks' files hold the same global parameters by construction: compare rank 0
        sharded = torch.load(tmp_path / f"{config.replace(':', '_')}.rank0.pt")
        ds = make_data(n=80, k=int(k))
        torch.manual_seed(0)
        single = TwoHeads(k=int(k), hidden=fsdp2_hidden(int(k)))
        initial = [p.detach().clone() for p in single.parameters()]
        callback = MultiTaskGradient(WEIGHTINGS[name](), mode=mode, subtract_last=variant != "exact")
        trainer(max_epochs=1, accumulate_grad_batches=int(accumulate), callbacks=[callback]).fit(single, loader(ds, 16))
        for a, c in zip(sharded, single.parameters(), strict=True):
            torch.testing.assert_close(a, c.detach(), rtol=1e-5, atol=1e-6, msg=config)
        assert not torch.equal(sharded[0], initial[0]), f"{config}: did not train"
        if k == "1":  # the norm of the whole gradient, from the shards of both ranks
            norms = torch.load(tmp_path / f"{config.replace(':', '_')}.rank0.norms.pt")
            torch.testing.assert_close(norms, callback.last_step.norms, rtol=1e-4, atol=0, msg=config)
    for config, message in FSDP2_ERRORS.items():
        for rank in (0, 1):
            assert message in (tmp_path / f"{config.replace(':', '_')}.rank{rank}.txt").read_text(), config


def test_fsdp1_and_deepspeed_are_refused_with_a_message():
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_mtl.callbacks.multitask import _check_strategy

    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # its __init__ needs the deepspeed package
    for mode in ("parameter", "representation"):
        _check_strategy(ModelParallelStrategy(), mode)
        with pytest.raises(MisconfigurationException, match="ModelParallelStrategy"):
            _check_strategy(FSDPStrategy(), mode)
        with pytest.raises(MisconfigurationException, match="DeepSpeed runs its own backward"):
            _check_strategy(deepspeed, mode)
