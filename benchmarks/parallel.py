"""Patch-parallel sampling: bytes each process moves per step and time per step, 1 vs P processes.

    python benchmarks/parallel.py                          # DiT-S/2 + clear r=8 at 256, 512, 1024 px, P=2 on CPU
    python benchmarks/parallel.py --resolutions 512 1024 2048 --procs 4 --device cuda
    python benchmarks/parallel.py --flux                   # a small random FLUX transformer + CLEAR, 64 text tokens

Run plainly, it times one process itself, then starts `torchrun --nproc_per_node P` on itself
for the P-process runs (one thread per process on CPU, so P processes use P cores). For each
resolution it reports, per process and sampling step (one forward, batch 1, no CFG):
  halo       bytes received by the halo exchange of `clear` (plus the pooled tokens, if any, and
             the all-gather of the output that every process needs for the scheduler step; with
             --flux also the log-sum-exp merge of the text queries' attention)
  all-gather bytes received when every layer all-gathers the keys and values of the whole
             sequence instead (`kv_exchange="allgather"`: what full attention needs), plus the output
             (with --flux the text queries then attend the gathered rows directly)
the time of a step with 1 and P processes (median after a warm-up), the speedups, the CPU time of
a step (the slowest process's with P: how the work splits, whatever else loads the cores; only
meaningful on CPU devices), and the largest difference between the P-process and the 1-process
output (exactness). Writes .md and .csv to --out.
A script, not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ditkit.distributed import STATS, PatchParallelDiT, strip_bounds
from ditkit.metrics.bench import device_name, timed_runs, write_csv
from ditkit.mixers.clear import halo
from ditkit.models import build_model, model_config


class DiTWorkload:
    """DiT with `clear`: `PatchParallelDiT` splits it."""

    def __init__(self, args, device):
        torch.manual_seed(0)  # the same weights in every process
        options = {"radius": args.radius, "down_factor": args.down_factor}
        self.model = build_model(model_config(args.model, mixer="clear", mixer_options=options)).to(device).eval()
        with torch.no_grad():  # DiT's init zeroes the output; random weights make the exactness check meaningful
            for param in self.model.parameters():
                param.normal_(0, 0.02)
        self.device = device

    @staticmethod
    def token_side(args, resolution: int) -> int:
        cfg = model_config(args.model)
        return resolution // cfg.vae_scale // cfg.patch_size

    def inputs(self, resolution: int) -> tuple:
        cfg = self.model.config
        side = resolution // cfg.vae_scale
        generator = torch.Generator().manual_seed(resolution)
        x = torch.randn(1, cfg.in_channels, side, side, generator=generator).to(self.device)
        return x, torch.tensor([500.0], device=self.device), torch.tensor([1], device=self.device)

    def step(self, inputs: tuple) -> Tensor:
        return self.model(*inputs)

    def parallel_step(self, exchange: str):
        return partial(call_with, PatchParallelDiT(self.model, kv_exchange=exchange))


class FluxWorkload:
    """A random FLUX transformer (2 double-stream, 4 single-stream blocks, width 256, 64 text tokens)
    with CLEAR processors; `patch_parallel` splits it. Image tokens are pixels / 16, as in FLUX.1."""

    TEXT_TOKENS = 64

    def __init__(self, args, device):
        from diffusers import FluxTransformer2DModel
        from ditkit.diffusers.clear import apply_clear

        torch.manual_seed(0)  # the same weights in every process
        self.model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                            attention_head_dim=64, num_attention_heads=4, joint_attention_dim=128,
                                            pooled_projection_dim=64, axes_dims_rope=[16, 24, 24]).to(device).eval()
        apply_clear(self.model, args.radius, args.down_factor)
        self.device = device

    @staticmethod
    def token_side(args, resolution: int) -> int:
        return resolution // 16

    def inputs(self, resolution: int) -> dict:
        side, generator = resolution // 16, torch.Generator().manual_seed(resolution)
        ys, xs = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
        tensors = dict(hidden_states=torch.randn(1, side * side, 64, generator=generator),
                       encoder_hidden_states=torch.randn(1, self.TEXT_TOKENS, 128, generator=generator),
                       pooled_projections=torch.randn(1, 64, generator=generator), timestep=torch.tensor([0.5]),
                       img_ids=torch.stack([torch.zeros_like(ys), ys, xs], -1).reshape(-1, 3),
                       txt_ids=torch.zeros(self.TEXT_TOKENS, 3))
        return {key: value.to(self.device) for key, value in tensors.items()}

    def step(self, inputs: dict) -> Tensor:
        return self.model(**inputs, return_dict=False)[0]

    def parallel_step(self, exchange: str):
        from ditkit.diffusers.patch_parallel import patch_parallel

        def step(inputs: dict) -> Tensor:
            with patch_parallel(self.model, kv_exchange=exchange):
                return self.step(inputs)
        return step


def workload(args, device):
    return (FluxWorkload if args.flux else DiTWorkload)(args, device)


def call_with(model, inputs: tuple) -> Tensor:
    return model(*inputs)


def median_seconds(fn, device, repeats: int) -> tuple[float, float]:
    """Median wall-clock and CPU (this process's) seconds of `repeats` calls after a warm-up. The CPU
    time is the work a process does, whatever else loads the machine's cores."""
    cpu = []

    def timed():
        start = time.process_time()
        fn()
        cpu.append(time.process_time() - start)

    with torch.no_grad():
        wall = timed_runs(timed, device, repeats=repeats, slow_seconds=1e9)[1:]
    return statistics.median(wall), statistics.median(cpu[1:])


def measure_one_process(args, device) -> dict:
    work, results = workload(args, device), {}
    for resolution in args.resolutions:
        inputs = work.inputs(resolution)
        with torch.no_grad():
            output = work.step(inputs)
        torch.save(output.cpu(), args.scratch / f"single-{resolution}.pt")
        results[resolution] = median_seconds(partial(work.step, inputs), device, args.repeats)
    return results


def in_step(step, inputs):
    dist.barrier()  # every process starts the step together: the time is the slowest strip's
    return step(inputs)


def measure_worker(args) -> None:
    """Inside torchrun: halo and all-gather runs, bytes and times; rank 0 writes JSON."""
    if args.device.startswith("cuda"):
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    work, results = workload(args, device), {}
    for resolution in args.resolutions:
        inputs = work.inputs(resolution)
        row = {}
        for exchange in ("halo", "allgather"):
            step = partial(in_step, work.parallel_step(exchange), inputs)
            with torch.no_grad():
                STATS.reset()
                output = step()
                received = torch.tensor([float(STATS.received)])
                dist.all_reduce(received, op=dist.ReduceOp.MAX)
                single = torch.load(args.scratch / f"single-{resolution}.pt")
                row[f"{exchange}_bytes"] = int(received.item())
                row[f"{exchange}_diff"] = (output.cpu() - single).abs().max().item()
            seconds = torch.tensor(median_seconds(step, device, args.repeats))
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest process's wall and CPU time
            row[f"{exchange}_seconds"], row[f"{exchange}_cpu_seconds"] = seconds.tolist()
        results[resolution] = row
    if dist.get_rank() == 0:
        (args.scratch / "parallel.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def launch_workers(args) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.procs),
               __file__, "--worker", "--scratch", str(args.scratch), *sys.argv[1:]]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    return {int(k): v for k, v in json.loads((args.scratch / "parallel.json").read_text()).items()}


def table_rows(args, single_times: dict, parallel: dict) -> list[dict]:
    single = {resolution: wall for resolution, (wall, _) in single_times.items()}
    single_cpu = {resolution: cpu for resolution, (_, cpu) in single_times.items()}
    rows = []
    for resolution in args.resolutions:
        side = (FluxWorkload if args.flux else DiTWorkload).token_side(args, resolution)
        heights = sorted({b - a for a, b in strip_bounds(side, args.procs)}, reverse=True)
        p = parallel[resolution]
        rows.append({
            "resolution": resolution, "tokens": side * side, "strip_rows": "/".join(map(str, heights)),
            "halo_rows": halo(args.radius, (side, side)),
            "halo_MB": round(p["halo_bytes"] / 2**20, 3), "allgather_MB": round(p["allgather_bytes"] / 2**20, 3),
            "bytes_ratio": round(p["allgather_bytes"] / p["halo_bytes"], 2),
            "seconds_1": round(single[resolution], 4), "seconds_P_halo": round(p["halo_seconds"], 4),
            "speedup_halo": round(single[resolution] / p["halo_seconds"], 2),
            "seconds_P_allgather": round(p["allgather_seconds"], 4),
            "speedup_allgather": round(single[resolution] / p["allgather_seconds"], 2),
            "cpu_seconds_1": round(single_cpu[resolution], 4), "cpu_seconds_P_halo": round(p["halo_cpu_seconds"], 4),
            "cpu_ratio_halo": round(single_cpu[resolution] / p["halo_cpu_seconds"], 2),
            "max_diff": max(p["halo_diff"], p["allgather_diff"]),
        })
    return rows


def markdown(rows: list[dict], title: str, procs: int) -> str:
    header = (f"| px | tokens | strip rows | halo rows | MB/process/step, halo | MB, K/V all-gather "
              f"| all-gather / halo | s/step, 1 proc | s/step, {procs} procs (halo) | speedup "
              f"| s/step, {procs} procs (all-gather) | speedup | CPU s/step, 1 proc "
              f"| CPU s/step, slowest of {procs} (halo) | CPU ratio | max abs diff vs 1 proc |")
    lines = [title, "", header, "|" + "---|" * 16]
    for r in rows:
        lines.append(f"| {r['resolution']} | {r['tokens']} | {r['strip_rows']} | {r['halo_rows']} | {r['halo_MB']:.3f} "
                     f"| {r['allgather_MB']:.3f} | {r['bytes_ratio']:.2f}x | {r['seconds_1']:.3f} "
                     f"| {r['seconds_P_halo']:.3f} | {r['speedup_halo']:.2f}x | {r['seconds_P_allgather']:.3f} "
                     f"| {r['speedup_allgather']:.2f}x | {r['cpu_seconds_1']:.3f} | {r['cpu_seconds_P_halo']:.3f} "
                     f"| {r['cpu_ratio_halo']:.2f}x | {r['max_diff']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--flux", action="store_true", help="measure a small random FLUX transformer with "
                        "CLEAR processors instead of --model (64 text tokens)")
    parser.add_argument("--radius", type=float, default=8)
    parser.add_argument("--down-factor", type=int, default=0)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024], help="square, in pixels")
    parser.add_argument("--procs", type=int, default=2, help="processes for the parallel runs")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", help="output file stem (default: parallel-<device>)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        measure_worker(args)
        return
    with tempfile.TemporaryDirectory() as scratch:
        args.scratch = Path(scratch)
        single = measure_one_process(args, torch.device(args.device))
        parallel = launch_workers(args)
    rows = table_rows(args, single, parallel)
    options = f"r={args.radius:g}" + (f", down_factor={args.down_factor}" if args.down_factor else "")
    model = (f"FLUX transformer (2 + 4 blocks, width 256, {FluxWorkload.TEXT_TOKENS} text tokens)" if args.flux
             else args.model)
    title = (f"Patch-parallel sampling, {model} + clear ({options}), {device_name(args.device)} per process, "
             f"float32, batch 1, one forward per step (no CFG); {args.procs} processes vs 1, median of "
             f"{args.repeats} after a warm-up")
    text = markdown(rows, title, args.procs)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"parallel-{'flux-' if args.flux else ''}{torch.device(args.device).type}"
    (args.out / f"{stem}.md").write_text(text + "\n")
    write_csv(rows, args.out / f"{stem}.csv")
    print(f"\nwrote {args.out / stem}.md, .csv")


if __name__ == "__main__":
    main()
