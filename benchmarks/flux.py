"""CLEAR on FLUX: what one transformer step costs, stock (full attention) vs CLEAR, as the size grows.

    python benchmarks/flux.py time --threads 1            # tiny random FLUX on CPU, 512..8192 px
    python benchmarks/flux.py flops                       # FLUX.1-dev's configuration on the meta device

`time` builds a tiny FluxTransformer2DModel at random init (cost does not depend on the weights) with
FLUX's sequence layout (512 text tokens, one image token per 16 px) and times one forward, float32,
batch 1, median of --repeats runs, for stock attention and each CLEAR setting. It reports the peak
memory and the largest single tensor the step creates next to one N x N fp32 score matrix (CLEAR
must never build one). A series stops once a step is projected above --max-seconds (from its last
two points' growth, see `projected_seconds`).

`flops` builds FluxTransformer2DModel with the FLUX.1-dev configuration on the meta device (no
weights) and counts one forward with torch's FlopCounterMode at 1024..8192 px. The CLEAR processors
read the token grid from `img_ids` values, which the meta device does not have, so CLEAR's attention
is counted analytically: 4 * D * (query, key) pairs per layer (the CLEAR paper's convention, D = 3072),
the pairs being text queries x every key, image queries x text keys, the disc's image pairs
(`local_pairs`, borders cut) and, with down-pooling, image queries x pooled tokens. Full attention is
counted both ways and the two agree (checked). CLEAR's whole step = the stock step's non-attention
FLOPs + its attention. A script, not a test: times depend on the machine.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from tables import step_row, write_results

from ditkit.diffusers.clear import apply_clear, remove_clear
from ditkit.metrics.bench import device_name, timed_runs
from ditkit.metrics.flops import EXTRA_FLOP_FORMULAS
from ditkit.metrics.memory import largest_tensor, peak_memory
from ditkit.mixers.clear import local_pairs

TEXT_TOKENS = 512  # FLUX.1-dev's T5 sequence length
PX_PER_TOKEN = 16  # VAE /8, then 2x2 packing
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
TINY = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 14, 14))
REPORTED_8K = {"full": 847.73, "clear r=8": 3.92}  # CLEAR paper, attention TFLOPs per layer at 8192 px


def image_ids(side: int) -> torch.Tensor:
    """FluxPipeline's img_ids for a side x side token grid: (0, row, column) per token, row-major."""
    ys, xs = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
    return torch.stack([torch.zeros_like(ys), ys, xs], -1).reshape(-1, 3)


def flux_inputs(config: dict, px: int) -> dict:
    """One call's inputs at px x px pixels, on the current default device."""
    side = px // PX_PER_TOKEN
    guidance = {"guidance": torch.full((1,), 3.5)} if config.get("guidance_embeds") else {}
    return dict(hidden_states=torch.randn(1, side * side, config["in_channels"]),
                encoder_hidden_states=torch.randn(1, TEXT_TOKENS, config["joint_attention_dim"]),
                pooled_projections=torch.randn(1, config["pooled_projection_dim"]), timestep=torch.full((1,), 0.5),
                img_ids=image_ids(side), txt_ids=torch.zeros(TEXT_TOKENS, 3), **guidance)


def settings(args) -> list[tuple[str, dict | None]]:
    """(label, apply_clear options or None for stock attention) for each series."""
    series = [("full", None)]
    for radius, down in args.clear:
        label = f"clear r={radius:g}" + (f" f={down}" if down else "")
        series.append((label, {"radius": radius, "down_factor": down}))
    return series


def parse_clear(text: str) -> tuple[float, int]:
    """'8' -> (8, 0); '16/4' -> radius 16 with down_factor 4."""
    radius, _, down = text.partition("/")
    return float(radius), int(down or 0)


# --- time ------------------------------------------------------------------------------------------

def measure(model, inputs: dict, repeats: int) -> dict:
    def step():
        return model(**inputs, return_dict=False)

    tokens = TEXT_TOKENS + inputs["hidden_states"].shape[1]
    with torch.inference_mode():
        times = timed_runs(step, "cpu", repeats)
        peak, largest = peak_memory(step), largest_tensor(step)
    return {"tokens": tokens, "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
            "peak_mib": peak / 2**20, "largest_mib": largest / 2**20, "nxn_fp32_mib": 4 * tokens**2 / 2**20}


def projected_seconds(points: list[dict], tokens: int, options: dict | None) -> float:
    """A step's time at `tokens`, from the series' last point: growing as N^2 (full attention) or N
    (CLEAR), or, once there are two points, as the measured log-log slope between them, within [1, 2]
    (pooled tokens make CLEAR partly quadratic, 1/f^2 of full attention's pairs)."""
    last = points[-1]
    exponent = 2 if options is None else 1
    if len(points) > 1:
        before = points[-2]
        slope = math.log(last["step_s"] / before["step_s"]) / math.log(last["tokens"] / before["tokens"])
        exponent = min(2.0, max(1.0, slope))
    return last["step_s"] * (tokens / last["tokens"]) ** exponent


def time_series(args) -> None:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY).eval()
    rows = []
    for label, options in settings(args):
        remove_clear(model)
        if options:
            apply_clear(model, **options)
        points = []
        for px in sorted(args.sizes):
            tokens = TEXT_TOKENS + (px // PX_PER_TOKEN) ** 2
            if points and projected_seconds(points, tokens, options) > args.max_seconds:
                rows.append({"attention": label, "px": px, "tokens": tokens, "status": "skipped (time budget)"})
                continue
            last = measure(model, flux_inputs(TINY, px), args.repeats)
            points.append(last)
            rows.append({"attention": label, "px": px, **last, "status": "ok"})
            print(f"{label:>14} {px:>5} px: {last['step_s']:.3f} s/step, peak {last['peak_mib']:.0f} MiB, "
                  f"largest tensor {last['largest_mib']:.1f} MiB", flush=True)
    write(time_table(rows, args), rows, args)


def time_table(rows: list[dict], args) -> str:
    full = {r["px"]: r for r in rows if r["attention"] == "full" and r["status"] == "ok"}
    dims = f"{TINY['num_layers']} double + {TINY['num_single_layers']} single blocks, " \
           f"{TINY['num_attention_heads']} heads x {TINY['attention_head_dim']}"
    lines = [f"# One FLUX transformer step on CPU: tiny random FLUX ({dims}), stock vs CLEAR", "",
             f"Device: {device_name('cpu')}; float32, batch 1, {TEXT_TOKENS} text tokens + (px/16)^2 image tokens; "
             f"median of {args.repeats} runs; CLEAR's default CPU backend (tiled); budget {args.max_seconds:g} s "
             "per step (sizes projected above it are skipped); speedup = full attention's s/step over this row's.", "",
             "| attention | px | tokens | s/step | peak MiB | largest tensor MiB | one N x N fp32 MiB | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = ""  # time of full attention over this one's, at the same size
        if r["status"] == "ok" and r["px"] in full and r is not full[r["px"]]:
            ratio = f"{full[r['px']]['step_s'] / r['step_s']:.2f}x"
        lines.append(step_row(r["attention"], r["px"], r, ratio))
    return "\n".join(lines) + "\n"


# --- flops -----------------------------------------------------------------------------------------

def attention_pairs(side: int, options: dict | None) -> int:
    """(query, key) pairs one attention layer scores on a side x side grid with 512 text tokens."""
    image = side * side
    if options is None:
        return (TEXT_TOKENS + image) ** 2
    pairs = TEXT_TOKENS * (TEXT_TOKENS + image) + image * TEXT_TOKENS + local_pairs((side, side), options["radius"])
    if options["down_factor"]:
        pairs += image * image // options["down_factor"] ** 2  # every image query sees every pooled token
    return pairs


def counted_stock_step(px: int) -> tuple[int, int]:
    """FlopCounterMode on the meta device: (whole step, attention) FLOPs of stock FLUX.1-dev at px."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV)
        inputs = flux_inputs(FLUX_DEV, px)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        model(**inputs, return_dict=False)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    # On meta, SDPA runs its math decomposition: its two batched matmuls are FLUX's only bmm.
    return counter.get_total_flops(), by_op.get("aten.bmm", 0)


def flops_table(args) -> None:
    layers = FLUX_DEV["num_layers"] + FLUX_DEV["num_single_layers"]
    width = FLUX_DEV["num_attention_heads"] * FLUX_DEV["attention_head_dim"]
    rows = []
    for px in sorted(args.sizes):
        side = px // PX_PER_TOKEN
        step, counted_attention = counted_stock_step(px)
        rest = step - counted_attention
        full_layer = 4 * width * attention_pairs(side, None)
        if counted_attention != layers * full_layer:
            raise RuntimeError(f"counted full attention {counted_attention} != analytic {layers * full_layer}")
        for label, options in settings(args):
            layer = 4 * width * attention_pairs(side, options)
            rows.append({"px": px, "tokens": TEXT_TOKENS + side * side, "attention": label,
                         "attn_layer_tflops": layer / 1e12, "attn_saved_pct": 100 * (1 - layer / full_layer),
                         "step_tflops": (rest + layers * layer) / 1e12, "attn_share_pct": 100 * layers * layer /
                         (rest + layers * layer), "step_saved_pct": 100 * (1 - (rest + layers * layer) / step)})
        print(f"{px} px counted", flush=True)
    write(flops_markdown(rows), rows, args)


def flops_markdown(rows: list[dict]) -> str:
    lines = ["# FLUX.1-dev forward FLOPs: stock vs CLEAR (counted on the meta device, no weights)", "",
             f"FluxTransformer2DModel, FLUX.1-dev config (19 double + 38 single blocks, 24 heads x 128); "
             f"{TEXT_TOKENS} text tokens; one forward, batch 1, a multiply-add = 2 FLOPs. Non-attention FLOPs "
             "counted by FlopCounterMode; attention per layer = 4 * 3072 * (query, key) pairs (CLEAR's "
             "convention; stock's count by FlopCounterMode agrees exactly), CLEAR's pairs from the disc "
             "(borders cut) + text rows/columns + pooled tokens. f = down_factor (pooled f x f keys/values).", "",
             "| px | tokens | attention | attn TFLOPs / layer | attn saved | step TFLOPs | attention share | "
             "step saved | CLEAR paper |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reported = REPORTED_8K.get(r["attention"]) if r["px"] == 8192 else None
        paper = f"{reported:g} TFLOPs/layer" + (" (-99.5%)" if r["attention"] != "full" else "") if reported else ""
        saved = ("", "") if r["attention"] == "full" else (f"{-r['attn_saved_pct']:+.1f}%",
                                                            f"{-r['step_saved_pct']:+.1f}%")
        lines.append(f"| {r['px']} | {r['tokens']} | {r['attention']} | {r['attn_layer_tflops']:.2f} | {saved[0]} | "
                     f"{r['step_tflops']:.1f} | {r['attn_share_pct']:.1f}% | {saved[1]} | {paper} |")
    return "\n".join(lines) + "\n"


def write(table: str, rows: list[dict], args) -> None:
    write_results(table, rows, args.out, args.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("time", help="step time, peak memory, largest tensor of a tiny FLUX on CPU")
    t.add_argument("--sizes", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192])
    t.add_argument("--max-seconds", type=float, default=45.0, help="skip sizes projected slower than this")
    t.add_argument("--repeats", type=int, default=2)
    t.add_argument("--name", default="flux-cpu")
    f = sub.add_parser("flops", help="FLOPs of FLUX.1-dev's configuration, counted on the meta device")
    f.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    f.add_argument("--name", default="flux-flops")
    for p in (t, f):
        p.add_argument("--clear", nargs="+", type=parse_clear, default=[(8, 0), (16, 4)] if p is t else
                       [(8, 0), (8, 4), (16, 0), (16, 4)], help="CLEAR settings: RADIUS or RADIUS/DOWN_FACTOR")
        p.add_argument("--threads", type=int)
        p.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    time_series(args) if args.mode == "time" else flops_table(args)


if __name__ == "__main__":
    main()
