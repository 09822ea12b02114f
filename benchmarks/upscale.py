"""The high-resolution chain: what one full-size sampling step costs, and what the size options do.

    python benchmarks/upscale.py cost                   # DiT-S/2 (SD-VAE latents), full vs clear, 512..4096 px
    python benchmarks/upscale.py cost --model DiT-XL/2 --resolutions 512 1024 --threads 1
    python benchmarks/upscale.py options --teacher runs/digits --student runs/digits-clear \\
        --base 32 --resolution 128 --strength 0.5 --out docs/upscale-options.png

`cost` builds the model at random init (cost does not depend on the weights) and times one guided
sampling step at each size: a forward over the batch doubled by classifier-free guidance, float32,
as `ditkit sample --upscale-from` runs it at full size. It reports the median time per step, the
peak memory, and the largest single tensor the step creates next to the size of one N x N score
matrix (fp32): local attention must never build one. A series stops once a step is projected
(from the last one, quadratically for full attention, linearly for clear) above --max-seconds.

`options` runs the chain (teacher at the base size, bicubic upsampling, student at full size) with
and without the proportional attention scale and the position scalings, on the same seeds, and
writes one labelled side-by-side PNG. A script, not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from tables import step_row, write_results

from ditkit.diffusion.sampling import guided_output
from ditkit.metrics.bench import device_name, timed_runs
from ditkit.metrics.memory import largest_tensor, peak_memory
from ditkit.models import build_model, model_config


def guided_step(model, config, size: int, device: torch.device):
    """fn(): one classifier-free-guided model call at `size` pixels (batch 1 -> 2)."""
    cells = size // config.vae_scale
    x = torch.randn(1, config.in_channels, cells, cells, device=device)
    t = torch.full((1,), 500.0, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    return lambda: guided_output(model, x, t, y, 4.0, config.num_classes)


def measure(model, config, size: int, device: torch.device, repeats: int) -> dict:
    step = guided_step(model, config, size, device)
    tokens = (size // config.vae_scale // config.patch_size) ** 2
    with torch.inference_mode():
        times = timed_runs(step, device, repeats)
        peak = peak_memory(step, device)
        largest = largest_tensor(step)
    return {"tokens": tokens, "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
            "peak_mib": peak / 2**20, "largest_mib": largest / 2**20, "nxn_fp32_mib": 4 * tokens**2 / 2**20}


def cost(args) -> None:
    device = torch.device(args.device)
    rows = []
    for mixer in args.mixers:
        options = {"radius": args.radius} if mixer == "clear" else {}
        config = model_config(args.model, mixer=mixer, mixer_options=options)
        model = build_model(config).to(device).eval()
        last = None
        for size in sorted(args.resolutions):
            tokens = (size // config.vae_scale // config.patch_size) ** 2
            if last is not None:
                growth = (tokens / last["tokens"]) ** (2 if mixer == "full" else 1)
                if last["step_s"] * growth > args.max_seconds:
                    rows.append({"mixer": mixer, "resolution": size, "tokens": tokens, "status": "skipped (time)"})
                    continue
            point = measure(model, config, size, device, args.repeats)
            rows.append({"mixer": mixer, "resolution": size, **point, "status": "ok"})
            last = point
            print(f"{mixer:>6} {size:>5} px: {point['step_s']:.3f} s/step, peak {point['peak_mib']:.0f} MiB, "
                  f"largest tensor {point['largest_mib']:.1f} MiB", flush=True)
    write_table(rows, args, device)


def write_table(rows: list[dict], args, device: torch.device) -> None:
    clear = {r["resolution"]: r for r in rows if r["mixer"] == "clear" and r["status"] == "ok"}
    lines = [f"# One guided sampling step at full size: {args.model}, full vs clear (r={args.radius})", "",
             f"Device: {device_name(device)}; float32, batch 1 doubled by CFG; median of {args.repeats} runs.", "",
             "| mixer | px | tokens | s/step | peak MiB | largest tensor MiB | one N x N fp32 MiB | clear speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = ""
        if r["status"] == "ok" and r["mixer"] == "full" and r["resolution"] in clear:
            speedup = f"{r['step_s'] / clear[r['resolution']]['step_s']:.1f}x"
        lines.append(step_row(r["mixer"], r["resolution"], r, speedup))
    write_results("\n".join(lines) + "\n", rows, args.out, args.name)


def options(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ditkit.checkpoint import load_checkpoint
    from ditkit.data.images import image_grid
    from ditkit.diffusion.pipeline import generate, generate_upscaled, upsample

    teacher, teacher_record = load_checkpoint(args.teacher)
    student, record = load_checkpoint(args.student)
    steps, cfg = record["diffusion"]["sample_steps"], record["diffusion"]["cfg_scale"]
    common = dict(num=args.num, steps=steps, cfg_scale=cfg, seed=args.seed, progress=False)
    chain = dict(height=args.resolution, width=args.resolution, base_height=args.base, base_width=args.base,
                 base_steps=teacher_record["diffusion"]["sample_steps"], base_model=teacher,
                 base_record=teacher_record, strength=args.strength, **common)
    base = generate(teacher, teacher_record, height=args.base, width=args.base, **common)
    rows = [("teacher at base size, bicubic (strength 0)", upsample(base, (args.resolution,) * 2).clamp(-1, 1)),
            ("student from noise at full size (no chain)",
             generate(student, record, height=args.resolution, width=args.resolution, **common))]
    for label, extra in [("chain", {}), ("chain + attention scale", {"attention_scale": True}),
                         ("chain + ntk positions", {"positions": "ntk"}),
                         ("chain + interpolated positions", {"positions": "interpolate"}),
                         ("chain + attention scale + interpolated", {"attention_scale": True,
                                                                     "positions": "interpolate"})]:
        print(f"sampling: {label}", flush=True)
        rows.append((label, generate_upscaled(student, record, **chain, **extra)))
    figure, axes = plt.subplots(len(rows), 1, figsize=(args.num * 1.3, len(rows) * 1.45))
    for ax, (label, images) in zip(axes, rows, strict=True):
        ax.imshow(image_grid(images, ncols=args.num), cmap="gray")
        ax.set_title(label, fontsize=8, loc="left")
        ax.axis("off")
    figure.suptitle(f"{args.base} px -> {args.resolution} px, strength {args.strength}", fontsize=9)
    figure.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("cost", help="time, peak memory and largest tensor of one full-size step")
    c.add_argument("--model", default="DiT-S/2")
    c.add_argument("--mixers", nargs="+", default=["full", "clear"])
    c.add_argument("--radius", type=float, default=8)
    c.add_argument("--resolutions", nargs="+", type=int, default=[512, 1024, 2048, 4096])
    c.add_argument("--max-seconds", type=float, default=60.0, help="skip sizes projected slower than this")
    c.add_argument("--repeats", type=int, default=2)
    c.add_argument("--threads", type=int)
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c.add_argument("--out", default="benchmarks/results")
    c.add_argument("--name", default="upscale-cpu")
    o = sub.add_parser("options", help="side-by-side PNG of the chain with and without the size options")
    o.add_argument("--teacher", required=True, help="checkpoint for the base size")
    o.add_argument("--student", required=True, help="checkpoint for the full size (e.g. a CLEAR student)")
    o.add_argument("--base", type=int, default=32)
    o.add_argument("--resolution", type=int, default=128)
    o.add_argument("--strength", type=float, default=0.5)
    o.add_argument("--num", type=int, default=6)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--out", default="docs/upscale-options.png")
    args = parser.parse_args()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    cost(args) if args.mode == "cost" else options(args)


if __name__ == "__main__":
    main()
