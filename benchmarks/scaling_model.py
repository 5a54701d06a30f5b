"""Step-time model (compute + ring all-reduce) for the two modes at 8-512 GPUs; writes ``benchmarks/scaling.md``.

The byte counts are the ones ``benchmarks/scaling.py`` measures in 2- and 4-process runs:

- DDP's gradient all-reduce: ``P * b`` bytes (b = 4 for fp32 gradients, 2 for bf16), overlapped with the backward.
- parameter mode adds ``(K-1) * P_shared * 4`` bytes (the captured task gradients, fp32), all-reduced after the
  backward, so not overlapped;
- representation mode adds ``K * K * 8`` bytes (the float64 Gramian); the rank-local option adds nothing.

Compute: a plain step is forward + backward = 3 forward-equivalents, ``3 * 2 * P * tokens`` FLOPs; parameter mode runs
the forward once and K backward passes through the shared trunk: ``(1 + 2K)`` forward-equivalents; representation
mode adds K backward passes through the heads only (counted as free here). Memory: parameter mode holds the K x
P_shared fp32 task Jacobian.

    python benchmarks/scaling_model.py      # regenerates the model tables in benchmarks/scaling.md
"""

from __future__ import annotations

from pathlib import Path

from _report import write_block

MD = Path(__file__).with_name("scaling.md")

# Assumptions (stated in the output): an H100-class GPU and a typical cluster.
PEAK_FLOPS = 989e12  # dense bf16
MFU = 0.40
TOKENS_PER_GPU = 8192  # per optimiser step
NVLINK_BUS_BW = 300e9  # bytes/s, ring bus bandwidth inside an 8-GPU node
IB_BUS_BW = 45e9  # bytes/s per GPU across nodes (one 400 Gb/s NIC per GPU)
HOP_LATENCY = 8e-6  # seconds per ring step
GRAD_BYTES = 2  # bf16 gradient all-reduce in DDP


def ring_allreduce_seconds(nbytes: float, world: int) -> float:
    bw = NVLINK_BUS_BW if world <= 8 else IB_BUS_BW
    return 2 * (world - 1) / world * nbytes / bw + 2 * (world - 1) * HOP_LATENCY


def step_times(params: float, k: int, world: int) -> dict[str, float]:
    fwd = 2 * params * TOKENS_PER_GPU / (PEAK_FLOPS * MFU)
    ddp = ring_allreduce_seconds(params * GRAD_BYTES, world)
    plain = max(3 * fwd, ddp + fwd)  # DDP overlaps its all-reduce with the backward (2 forward-equivalents)
    param_compute = (1 + 2 * k) * fwd
    param = max(param_compute, ddp + fwd) + ring_allreduce_seconds((k - 1) * params * 4, world)
    rep = plain + ring_allreduce_seconds(k * k * 8, world)
    return {
        "plain": plain,
        "parameter": param,
        "representation": rep,
        "rank-local": plain,
        "param_comm": ring_allreduce_seconds((k - 1) * params * 4, world),
        "param_compute": param_compute,
    }


def tables() -> str:
    out = []
    for params in (0.1e9, 1e9, 7e9):
        out += [
            f"**{params / 1e9:g}B shared parameters** (parameter mode holds a K x P fp32 task Jacobian: "
            f"{4 * params / 2**30:.1f} GiB per task).",
            "",
            "| GPUs | K | plain step | parameter mode | of which exposed extra all-reduce | representation | "
            "parameter / plain | communication-bound? |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for world in (8, 64, 512):
            for k in (2, 4, 8, 16):
                t = step_times(params, k, world)
                bound = "yes" if t["param_comm"] > t["param_compute"] else "no"
                out.append(
                    f"| {world} | {k} | {1e3 * t['plain']:.0f} ms | {1e3 * t['parameter']:.0f} ms | "
                    f"{1e3 * t['param_comm']:.0f} ms | {1e3 * t['representation']:.0f} ms | "
                    f"{t['parameter'] / t['plain']:.1f}x | {bound} |"
                )
        out.append("")
    return "\n".join(out)


def main() -> None:
    text = tables().rstrip("\n")
    write_block(MD, "<!-- BEGIN model -->", "<!-- END model -->", text)
    print(text)


if __name__ == "__main__":
    main()
