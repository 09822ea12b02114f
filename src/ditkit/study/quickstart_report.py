"""report.md of a quickstart: settings, stage times, tables, grids and plots, and a short reading
of the numbers, written from the files the stages left in the out folder (links are relative)."""

from __future__ import annotations

import csv
import json
import math
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..files import read_jsonl
from .quickstart_samples import SAMPLE_SETS, UPSCALE_STRENGTH, SampleSet, load_images
from .stages import Stage, format_seconds

if TYPE_CHECKING:  # the quickstart hands itself to the report; only its type is named here
    from .quickstart import Quickstart


def bench_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def number(value, digits: int = 2) -> str:
    return "-" if value in (None, "") or (isinstance(value, float) and not math.isfinite(value)) \
        else f"{float(value):,.{digits}f}"


# ---------------------------------------------------------------- sections

def settings_section(qs: Quickstart) -> list[str]:
    teacher = qs.teacher_config().to_dict()
    distill = qs.distill_config()
    return ["## Settings", "",
            f"Scale `{qs.settings.scale}`, device `{qs.device}`, torch threads {torch_threads()}. "
            "The teacher's training config:", "", "```yaml",
            yaml.safe_dump({k: teacher[k] for k in ("model", "data", "diffusion")}, sort_keys=False).strip(),
            yaml.safe_dump({"train": {k: teacher["train"][k] for k in ("steps", "batch_size", "lr", "ema_decay")}},
                           sort_keys=False).strip(), "```", "",
            f"Distillation: radius {distill.radius:g}, {distill.num_samples:,} teacher samples, {distill.steps} "
            f"steps of batch {distill.batch_size}, AdamW lr {distill.lr:g}, loss weights task "
            f"{distill.weights.task:g} / output {distill.weights.output:g} / attention "
            f"{distill.weights.attention:g}. Quickstart settings: `quickstart.json`.", ""]


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def timing_section(qs: Quickstart, stages: tuple[Stage, ...]) -> list[str]:
    lines = ["## Time per stage", "", "| stage | time |", "|---|---|"]
    total = 0.0
    for number_, stage in enumerate(stages, 1):
        marker = qs.runner.marker(stage)
        if stage.name == "report" or not marker.is_file():
            continue
        seconds = json.loads(marker.read_text())["seconds"]
        total += seconds
        lines.append(f"| {number_} {stage.title} | {format_seconds(seconds)} |")
    lines += [f"| **total** (before the report) | **{format_seconds(total)}** |", "",
              "Times are those of the run that did each stage (a resumed stage counts its last part only).", ""]
    return lines


def teacher_section(qs: Quickstart) -> list[str]:
    records = read_jsonl(qs.teacher_dir / "metrics.jsonl")
    last = records[-1] if records else {}
    speeds = [r["steps_per_sec"] for r in records if "steps_per_sec" in r]
    speed = f", {sum(speeds) / len(speeds):.1f} steps/s on average" if speeds else ""
    return ["## 1. Teacher (full attention)", "",
            f"{qs.settings.teacher_steps:,} steps, final training loss {number(last.get('loss'), 4)}{speed}.", "",
            "![teacher training loss](teacher-loss.png)", ""]


def distill_section(qs: Quickstart) -> list[str]:
    agreement = json.loads((qs.student_dir / "agreement.json").read_text())
    eval_num = qs.distill_config().eval_num
    lines = ["## 2. CLEAR student (distilled)", "",
             f"Agreement with the teacher on {eval_num} held-out samples (same noise and labels), from the "
             "distillation's own report (`student/agreement.json`):", "",
             "| size | untuned PSNR | untuned SSIM | distilled PSNR | distilled SSIM | attention work vs full |",
             "|---|---|---|---|---|---|"]
    for size, student in agreement["student"].items():
        untuned, work = agreement["untuned"][size], agreement["attention_work"].get(size)
        lines.append(f"| {size} px | {number(untuned['psnr'])} dB | {number(untuned['ssim'], 3)} | "
                     f"{number(student['psnr'])} dB | {number(student['ssim'], 3)} | "
                     f"{'-' if work is None else f'{100 * work:.0f}%'} |")
    return lines + ["", "Untuned: the teacher with its attention swapped for `clear`, nothing trained. Rows of the "
                    "comparison: teacher, untuned, distilled.", "",
                    "![teacher, untuned and distilled student](distill-compare.png)", "",
                    "![distillation loss](distill-loss.png)", ""]


def samples_section(qs: Quickstart) -> list[str]:
    lines = ["## 3. Samples", "",
             f"The same seed and labels (classes 0-{qs.settings.grid_num - 1}) for every row. Time per image: "
             f"a batch of {qs.settings.grid_num}, the teacher's sampler, steps and guidance.", "",
             "| row | size | time per image |", "|---|---|---|"]
    for sample_set in SAMPLE_SETS:
        images, seconds = load_images(qs.sample_path(sample_set))
        lines.append(f"| {sample_set.label} | {images.shape[-1]} px ({sample_set.scale}x) | "
                     f"{1000 * seconds / len(images):,.0f} ms |")
    lines.append("")
    for scale in sorted({s.scale for s in SAMPLE_SETS}):
        rows = "; ".join(s.label for s in SAMPLE_SETS if s.scale == scale)
        size = scale * qs.resolution
        lines += [f"{size} px ({scale}x the training size); rows: {rows}", "",
                  f"![samples at {size} px](samples-{size}.png)", ""]
    return lines


def quality_section(qs: Quickstart) -> list[str]:
    quality = json.loads((qs.out / "quality.json").read_text())
    any_score = next(iter(quality["fid"].values()))
    lines = ["## 4. Quality", "",
             f"FID and KID with the offline `ditkit-digits` features: {any_score['num_generated']} images each "
             f"against {any_score['num_reference']} real digits at {qs.resolution} px. **A ditkit-only scale**: "
             "compare the rows with each other, never with published FIDs. \"real digits\" are held-out digits, "
             "as many as the samples: the floor at this sample count.", "",
             "| images | FID | KID | IS | sampling time per image (batches of 64) |", "|---|---|---|---|---|"]
    for name, s in quality["fid"].items():
        lines.append(f"| {name} | {number(s['fid'])} | {number(s['kid_mean'], 4)} +- {number(s['kid_std'], 4)} | "
                     f"{number(s['is_mean'])} | {fid_sampling_ms(qs, name)} |")
    lines += ["", "Student vs teacher, image by image (same noise and labels):", "",
              "| size | images | PSNR | SSIM |", "|---|---|---|---|"]
    for size, a in quality["agreement"].items():
        lines.append(f"| {size} px | {a['num']} | {number(a['psnr'])} dB | {number(a['ssim'], 3)} |")
    return lines + [""] + legibility_table(quality.get("legibility", {}))


def legibility_table(rows: dict) -> list[str]:
    if not rows:
        return []
    lines = ["Legibility: the share of images that the ditkit-digits classifier reads as the class they were "
             "sampled for (it reads any size, resized to 16 px). Unlike FID it applies at 4x too; grid rows hold "
             "few images, so read them as counts.", "",
             "| images | size | images read as their class |", "|---|---|---|"]
    for row in rows.values():
        size = f"{row['size']} px" if row["size"] else "-"
        count = f" ({round(row['accuracy'] * row['num'])} of {row['num']})" if row["num"] else ""
        lines.append(f"| {row['label']} | {size} | {100 * row['accuracy']:.1f}%{count} |")
    return lines + [""]


def fid_sampling_ms(qs: Quickstart, name: str) -> str:
    path = qs.out / "quality" / f"{name}-fid.safetensors"
    if not path.is_file():  # real digits are not sampled
        return "-"
    images, seconds = load_images(path)
    return f"{1000 * seconds / len(images):,.0f} ms"


def bench_pairs(qs: Quickstart) -> list[dict]:
    """Per size: the full and the clear row of the bench."""
    rows = bench_rows(qs.out / "bench" / "bench.csv")
    by_size: dict[str, dict] = {}
    for row in rows:
        by_size.setdefault(row["resolution"], {})["full" if row["mixer"] == "full" else "clear"] = row
    return [pair | {"resolution": size} for size, pair in by_size.items() if {"full", "clear"} <= set(pair)]


def timed(row: dict) -> float | None:
    return float(row["step_ms"]) if row["status"] == "ok" else None


def bench_section(qs: Quickstart) -> list[str]:
    lines = ["## 5. Benchmark: full vs clear", "",
             f"The quickstart's model with random weights, float32, batch 1, one forward per sampling step (no "
             f"CFG), median of 3 after a warm-up; clear at radius {qs.settings.radius:g}. Full table with "
             "parameters and fitted slopes: [bench/bench.md](bench/bench.md).", "",
             "| size | tokens | full ms/step | clear ms/step | full / clear time | full GFLOPs | clear GFLOPs | "
             "full peak MiB | clear peak MiB | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for pair in bench_pairs(qs):
        full, clear = pair["full"], pair["clear"]
        ratio = timed(full) / timed(clear) if timed(full) and timed(clear) else None
        notes = "; ".join(f"{name}: {row['status']}" for name, row in (("full", full), ("clear", clear))
                          if row["status"] != "ok")
        lines.append(f"| {pair['resolution']} px | {full['tokens'] or '-'} | {number(timed(full), 1)} | "
                     f"{number(timed(clear), 1)} | {number(ratio)} | {number(full['gflops'], 3)} | "
                     f"{number(clear['gflops'], 3)} | {number(full['peak_mib'], 1)} | "
                     f"{number(clear['peak_mib'], 1)} | {notes} |")
    return lines + ["", "![time and FLOPs per step against tokens](bench.png)", ""]


# ---------------------------------------------------------------- the reading

def reading_section(qs: Quickstart) -> list[str]:
    """A few sentences computed from the numbers: what improved, what did not."""
    agreement = json.loads((qs.student_dir / "agreement.json").read_text())
    quality = json.loads((qs.out / "quality.json").read_text())
    size = str(qs.resolution)
    untuned, student, paired = agreement["untuned"][size], agreement["student"][size], quality["agreement"][size]
    verb = "raised" if student["psnr"] > untuned["psnr"] else "did not raise"
    lines = ["## Reading", "",
             f"- **Distillation** ({qs.settings.distill_steps} steps) {verb} the student's agreement with the "
             f"teacher at {size} px from {number(untuned['psnr'])} dB / SSIM {number(untuned['ssim'], 3)} "
             f"(attention swapped, untrained) to {number(student['psnr'])} dB / {number(student['ssim'], 3)} on "
             f"{qs.distill_config().eval_num} held-out samples; over the {paired['num']} FID samples it agrees at "
             f"{number(paired['psnr'])} dB / {number(paired['ssim'], 3)}.",
             quality_reading(quality["fid"], size)]
    for other, a in quality["agreement"].items():
        if other != size:
            lines.append(large_reading(qs, other, a, quality.get("legibility", {})))
    lines.append(bench_reading(qs))
    return lines + [""]


def large_reading(qs: Quickstart, size: str, paired: dict, legibility: dict) -> str:
    scale = int(size) // qs.resolution
    line = (f"- **At {size} px** ({scale}x the training size) from noise, both models are far outside what they "
            f"were trained on: a pixel-space model sampled at {size} px tends to draw strokes at its training "
            f"scale, so expect broken digits rather than larger ones. The student still follows the teacher "
            f"({number(paired['psnr'])} dB / SSIM {number(paired['ssim'], 3)} over {paired['num']} images).")
    read = {name: legibility.get(f"{name}-{scale}x") for name in ("teacher", "student")}
    chain = next((s for s in SAMPLE_SETS if s.upscaled and s.scale == scale), None)
    if all(read.values()):
        line += (f" The digits classifier reads {count(read['teacher'])} of the teacher's and "
                 f"{count(read['student'])} of the student's as their class.")
    if chain is not None and legibility.get(chain.name):
        line += (f" The upscale chain (the teacher's {qs.resolution} px images, upsampled, noised to strength "
                 f"{UPSCALE_STRENGTH} and denoised by the student at {size} px with interpolated positions) "
                 f"gives {count(legibility[chain.name])} legible digits, in "
                 f"{chain_time_ratio(qs, chain)} the time of the student's samples from noise.")
    return line


def count(row: dict) -> str:
    return f"{round(row['accuracy'] * row['num'])}/{row['num']}"


def chain_time_ratio(qs: Quickstart, chain) -> str:
    chain_seconds = load_images(qs.sample_path(chain))[1]
    noise_seconds = load_images(qs.sample_path(SampleSet(chain.model, chain.scale)))[1]
    return f"{chain_seconds / noise_seconds:.2f}x"


def quality_reading(fid: dict, size: str) -> str:
    teacher, student = fid["teacher"]["fid"], fid["student"]["fid"]
    line = f"- **Quality** at {size} px (ditkit-digits FID, lower is better): teacher {number(teacher)}, " \
           f"student {number(student)}"
    if "real digits" not in fid:
        return line + "."
    floor = fid["real digits"]["fid"]
    gap = "smaller" if abs(student - teacher) < abs(teacher - floor) else "not smaller"
    return (line + f", held-out real digits {number(floor)}. The student-teacher gap is {gap} than the gap "
            "between the teacher and real digits.")


NOISE = 1.1  # step times closer than 10% are within the noise of a shared CPU


def bench_reading(qs: Quickstart) -> str:
    pairs = bench_pairs(qs)
    both = [p for p in pairs if timed(p["full"]) and timed(p["clear"])]
    if not both:
        return "- **Speed**: no size was timed for both mixers."
    ratio = {p["resolution"]: timed(p["full"]) / timed(p["clear"]) for p in both}
    groups = [("clear is faster", [r for r, x in ratio.items() if x >= NOISE]),
              ("within 10%", [r for r, x in ratio.items() if 1 / NOISE < x < NOISE]),
              ("full attention is faster", [r for r, x in ratio.items() if x <= 1 / NOISE])]
    where = "; ".join(f"{label} at {', '.join(sizes)} px" for label, sizes in groups if sizes)
    largest = both[-1]
    line = (f"- **Speed** (step time): {where}. At {largest['resolution']} px ({largest['full']['tokens']} tokens) "
            f"a full-attention step takes {ratio[largest['resolution']]:.2f}x the time of a clear one and "
            f"{flops_ratio(largest):.2f}x its FLOPs.")
    beyond = [p for p in pairs if timed(p["clear"]) and not timed(p["full"])]
    if beyond:
        p = beyond[-1]
        line += (f" At {p['resolution']} px full attention needs {flops_ratio(p):.1f}x clear's FLOPs and its step "
                 f"was {p['full']['status']}; clear's took {number(timed(p['clear']), 0)} ms.")
    if qs.device == "cpu":
        line += (" Up to 1,024 tokens no gain is expected: there clear's `auto` backend on CPU runs a dense masked "
                 "kernel (the FLOPs of full attention), so differences are noise or kernel overheads; its linear "
                 "tiled kernel takes over above 1,024 tokens.")
    return line


def flops_ratio(pair: dict) -> float:
    return float(pair["full"]["gflops"]) / float(pair["clear"]["gflops"])


def quickstart_report(qs: Quickstart, stages: tuple[Stage, ...]) -> str:
    """report.md of the quickstart `qs`, whose `stages` ran (their times are in the runner's markers)."""
    lines = ["# ditkit quickstart", "",
             "A full-attention DiT trained on the built-in digits (the teacher), a CLEAR local-attention student "
             "distilled from it, both sampled at 1x and 4x the training size, scored and benchmarked. "
             "Made by `ditkit quickstart`; every file linked here is in this folder.", ""]
    for section in (reading_section, settings_section, partial(timing_section, stages=stages), teacher_section,
                    distill_section, samples_section, quality_section, bench_section):
        lines += section(qs)
    return "\n".join(lines)
