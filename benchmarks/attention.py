"""Attention cost vs tokens: full SDPA against the CLEAR backends (and flex_attention), U-DiT's
downsampled attention and DiffuSSM's bidirectional S4D (the attention-free `ssm` mixer's core).

    python benchmarks/attention.py                      # CPU: grids 32^2..256^2, r in {8, 16}
    python benchmarks/attention.py --sides 64 128 256 512 --device cuda
    python benchmarks/attention.py --radii 8 --methods full ssm --threads 1 --name attention-cpu-with-ssm

For each grid and radius it measures forward and forward+backward time, peak memory and FLOPs
(4 * N_q * N_kv * d per head: the CLEAR paper's convention, N_kv = keys a query may see) and
prints a markdown table, the speedups of the clear backends over full attention next to their
FLOP ratio (the physical limit), and the log-log slope of time vs tokens. The SSM row runs the
S4D core as DiffuSSM does for width heads x head_dim = D: kernels computed in the call, then FFT
convolutions over 2D channels (D forward, D backward; q and k's values as input); its FLOPs are
counted (FFTs as 2.5 n log2 n per real transform, the kernel's matmul). It writes the table
(.md, .csv) and a log-log plot (.png) to --out. A script, not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ditkit.metrics import count_flops
from ditkit.metrics.bench import device_name, write_csv
from ditkit.metrics.memory import peak_memory
from ditkit.mixers.clear import disc_size, local_pairs, reference_local_attention
from ditkit.mixers.downsampled import subgrid_attention
from ditkit.mixers.flex import flex_local_attention
from ditkit.mixers.ssm import BidirectionalS4D
from ditkit.mixers.tiled import tiled_local_attention

SSM = "ssm (S4D, DiffuSSM)"
RADIUS_FREE = ("full", "downsampled (U-DiT)", SSM)


def ssm_core(width: int, device: torch.device, state_size: int = 64):
    """fn(q, k, v): bidirectional S4D over 2 x width channels, q and k's values as (B, N, 2 x width) input."""
    layer = BidirectionalS4D(width, state_size).to(device)

    def run(q, k, v):
        B, _, N, _ = q.shape
        return layer(torch.cat([q, k], dim=1).permute(0, 2, 1, 3).reshape(B, N, 2 * width))

    return run


def ssm_flops(args, N: int) -> int:
    """Counted on the meta device: FFTs and the kernel matmul of one forward."""
    with torch.device("meta"):
        q = torch.empty(args.batch, args.heads, N, args.head_dim)
        return count_flops(ssm_core(args.heads * args.head_dim, torch.device("meta")), q, q, q)


def methods(args, side: int, radius: float, device: torch.device):
    """(name, function, supports backward) for each method that fits this size."""
    grid = (side, side)
    dense_ok = side <= args.max_dense_side
    yield "full", lambda q, k, v: F.scaled_dot_product_attention(q, k, v), True
    yield SSM, ssm_core(args.heads * args.head_dim, device), True
    if dense_ok:
        yield "clear/reference", lambda q, k, v: reference_local_attention(q, k, v, grid, radius), True
    yield "clear/tiled", lambda q, k, v: tiled_local_attention(q, k, v, grid, radius), True
    if side % 2 == 0:  # U-DiT: attention within the four 2x2 phase sub-grids (radius-independent)
        yield "downsampled (U-DiT)", lambda q, k, v: subgrid_attention(q, k, v, grid, 2), True
    compiled = device.type == "cuda" or args.flex_compile
    if compiled or dense_ok:  # eager flex materialises all scores: small grids only
        backward = device.type == "cuda"  # flex has no backward on CPU
        label = "compiled" if compiled else "eager"
        for order in ("tiles", "rows"):
            yield (f"clear/flex-{order} ({label})",
                   lambda q, k, v, order=order: flex_local_attention(q, k, v, grid, radius, order=order,
                                                                     compile=compiled), backward)


def backward_step(fn, q, k, v) -> None:
    fn(q, k, v).sum().backward()


def timed(fn, device: torch.device, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    fn()  # warm-up (and compilation)
    sync()
    warm_up = time.perf_counter() - start
    if warm_up > 20 and device.type == "cpu":  # slow eager CPU cases: the warm-up is a fair timing
        return warm_up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
        if best > 5:  # slow cases: one timing is enough
            break
    return best


def measure(args, device: torch.device) -> list[dict]:
    rows = []
    dtype = getattr(torch, args.dtype)
    for side in args.sides:
        N = side * side
        shape = (args.batch, args.heads, N, args.head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        for radius in args.radii:
            for name, fn, has_backward in methods(args, side, radius, device):
                if args.methods and not any(name.startswith(m) for m in args.methods):
                    continue
                if name in RADIUS_FREE and radius != args.radii[0]:  # measured once per grid
                    rows.append({**next(r for r in rows if r["side"] == side and r["method"] == name),
                                 "radius": radius})
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    step = partial(fn, q, k, v)
                    forward = timed(step, device, args.repeats)
                    both = None
                    if has_backward and not args.no_backward:
                        step = partial(backward_step, fn, qg, kg, vg)
                        both = timed(step, device, args.repeats)
                    # The CPU tracker (a dispatch mode) cannot look inside flex_attention's operator.
                    tracked = device.type == "cuda" or "flex" not in name
                    memory = peak_memory(step, device) / 2**20 if tracked else None
                dense = {"full": N * N, "downsampled (U-DiT)": N * N // 4}
                pairs = dense.get(name) or local_pairs((side, side), radius)
                flops = ssm_flops(args, N) if name == SSM else 4 * pairs * args.head_dim * args.heads * args.batch
                rows.append({"side": side, "tokens": N, "radius": radius, "method": name, "forward_ms": forward * 1e3,
                             "fwd_bwd_ms": None if both is None else both * 1e3, "peak_mb": memory,
                             "gflops": flops / 1e9})
                print(f"  {side}^2 r={radius:g} {name:28s} fwd {forward * 1e3:9.1f} ms"
                      + (f"  fwd+bwd {both * 1e3:9.1f} ms" if both else "")
                      + (f"  peak {memory:8.1f} MiB" if memory is not None else ""),
                      flush=True)
    return rows


def slope(rows: list[dict], method: str, radius: float, key: str, lo: int, hi: int) -> float | None:
    points = {r["side"]: r[key] for r in rows if r["method"] == method and r["radius"] == radius and r[key]}
    if lo == hi or lo not in points or hi not in points:
        return None
    return math.log(points[hi] / points[lo]) / math.log((hi * hi) / (lo * lo))


def report(rows: list[dict], args, device: torch.device) -> str:
    lines = [f"# Attention benchmark ({device_name(device)}, {args.dtype}, batch {args.batch}, "
             f"{args.heads} heads x {args.head_dim})", "",
             "| tokens | r | method | fwd ms | fwd+bwd ms | peak MiB | GFLOPs | speedup fwd | speedup fwd+bwd "
             "| FLOP ratio | fwd speedup / FLOP ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        full = next(x for x in rows if x["side"] == r["side"] and x["method"] == "full")
        speed = full["forward_ms"] / r["forward_ms"]
        speed_both = full["fwd_bwd_ms"] / r["fwd_bwd_ms"] if r["fwd_bwd_ms"] and full["fwd_bwd_ms"] else None
        ratio = full["gflops"] / r["gflops"]
        both = "-" if r["fwd_bwd_ms"] is None else f"{r['fwd_bwd_ms']:.1f}"
        speedup_both = "-" if speed_both is None else f"{speed_both:.1f}x"
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        lines.append(f"| {r['side']}^2 | {r['radius']:g} | {r['method']} | {r['forward_ms']:.1f} | {both} | "
                     f"{peak} | {r['gflops']:.2f} | {speed:.1f}x | {speedup_both} | {ratio:.1f}x | "
                     f"{speed / ratio:.0%} |")
    lines += ["", "Log-log slope of time vs tokens (1 = linear, 2 = quadratic):", ""]
    sides = sorted({r["side"] for r in rows})
    hi = sides[-1]
    lo = 64 if 64 in sides and hi > 64 else sides[0]
    for radius in args.radii:
        for method in sorted({r["method"] for r in rows}):
            for key in ("forward_ms", "fwd_bwd_ms"):
                s = slope(rows, method, radius, key, lo, hi)
                if s is not None:
                    lines.append(f"- r={radius:g} {method} {key.replace('_ms', '')}: {s:.2f} ({lo}^2 -> {hi}^2)")
    lines += ["", f"Interior keys per query: {', '.join(f'r={r:g}: {disc_size(r)}' for r in args.radii)}."]
    return "\n".join(lines)


def plot(rows: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.radii), figsize=(6 * len(args.radii), 4.5), squeeze=False)
    for ax, radius in zip(axes[0], args.radii, strict=True):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = [(r["tokens"], r["forward_ms"]) for r in rows if r["method"] == method and r["radius"] == radius]
            ax.loglog(*zip(*pts, strict=True), marker="o", label=method)
        ax.set(xlabel="image tokens N", ylabel="forward time (ms)", title=f"r = {radius:g}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 64, 128, 256], help="token grid sides")
    parser.add_argument("--radii", type=float, nargs="+", default=[8, 16])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-dense-side", type=int, default=64, help="largest grid for N x N methods")
    parser.add_argument("--flex-compile", action="store_true", help="also compile flex on CPU (slow)")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--threads", type=int, help="CPU threads (1 is steadier on a shared machine)")
    parser.add_argument("--methods", nargs="+", help="only methods whose name starts with one of these")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default=None, help="output file stem (default: attention-<device>)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = measure(args, device)
    text = report(rows, args, device)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"attention-{device.type}"
    (args.out / f"{stem}.md").write_text(text + "\n")
    write_csv(rows, args.out / f"{stem}.csv")
    plot(rows, args, args.out / f"{stem}.png")
    print(f"\nwrote {args.out / stem}.md, .csv, .png")


if __name__ == "__main__":
    main()
