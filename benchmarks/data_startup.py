"""Data at scale: start-up time, resident memory and loader throughput of each training source, at two
dataset sizes (by default 10,000 and 100,000 small JPEGs).

    OMP_NUM_THREADS=1 python benchmarks/data_startup.py                 # 10K and 100K, 32 px, ~15 min
    python benchmarks/data_startup.py --sizes 1000 5000 --steps 20      # a quick look

For each size N it writes a synthetic ImageNet-like folder (100 class folders n00000000..., N JPEGs of
random blocks) and the same images as the other sources: a Hugging Face `datasets` folder
(`save_to_disk`), parquet files, WebDataset tar shards, and latents made by `ditkit prepare` with a tiny
random VAE. Then, for each source, each in a fresh process:
  open          seconds to open the source (Trainer construction: list, index or read the manifest, and
                build the small model), the first time and again in the same process once the listing
                or shard index is cached
  first step    seconds from the process start to the end of the first training step, and the part of
                it the interpreter and imports take (the same for every source): the rest is what
                listing, indexing or opening the data costs before training (and one step)
  RSS           resident memory after the last of --steps training steps (VmRSS, and its anonymous part:
                memory-mapped shards show as file-backed pages the kernel can drop), and the peak
  loader        items/s of the data loader alone (the trainer's own sampler, batch 64, num_workers 0),
                against the items/s of the training steps (loader plus model), so one sees which bounds
The model is a small DiT (DiT-Nano/4: 64 tokens at 32 px in pixels, 16 on the 16x16x4 latents): the point
is the data path, not the model. Memory and start-up that do not grow with N show as equal rows at both
sizes. Writes data-startup-<device>.md and .csv to --out (Linux: it reads /proc/self/status).
A script, not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ditkit.metrics.bench import device_name, write_csv

CLASSES = 100
RESOLUTION = 32
BATCH = 64
MODEL = ["model.name=DiT-Nano/4"]


def status_mib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM, RssAnon), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no {field} in /proc/self/status: this benchmark needs Linux")


# -- the data -------------------------------------------------------------------------------------------
def picture(index: int) -> np.ndarray:
    """A 32 x 32 RGB image of random 4 x 4 blocks (seeded by its index): compresses like a photo, roughly."""
    blocks = np.random.default_rng(index).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return blocks.repeat(4, 0).repeat(4, 1)


def write_folder(root: Path, n: int) -> None:
    """`root/n0000000k/<i>.JPEG`, as ImageNet ships its train split."""
    from PIL import Image

    for index in range(n):
        folder = root / f"n{index % CLASSES:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture(index)).save(folder / f"{index:07d}.JPEG", quality=90)


def folder_items(root: Path):
    """(JPEG bytes, label) of the folder, in file order."""
    for label, folder in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        for path in sorted(folder.iterdir()):
            yield path.read_bytes(), label


def hf_rows(root: str):
    for data, label in folder_items(Path(root)):
        yield {"image": {"bytes": data, "path": None}, "label": label}


def write_hf(root: Path, out: Path) -> None:
    """The folder as a `datasets` Dataset (Image + ClassLabel features): saved with save_to_disk and as
    parquet files."""
    from datasets import ClassLabel, Dataset, Features, Image

    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    dataset = Dataset.from_generator(hf_rows, features=features, gen_kwargs={"root": str(root)},
                                     cache_dir=str(out / "hf-cache"))
    dataset.save_to_disk(str(out / "hf"))
    (out / "parquet").mkdir()
    shards = max(1, len(dataset) // 10_000)
    for k in range(shards):
        dataset.shard(shards, k, contiguous=True).to_parquet(str(out / "parquet" / f"train-{k:05d}.parquet"))


def write_tars(root: Path, out: Path) -> None:
    """The folder as WebDataset tar shards of 10,000 (.jpg + .cls)."""
    import webdataset as wds

    (out / "wds").mkdir()
    with wds.ShardWriter(str(out / "wds" / "train-%05d.tar"), maxcount=10_000, verbose=0) as sink:
        for index, (data, label) in enumerate(folder_items(root)):
            sink.write({"__key__": f"{index:07d}", "jpg": data, "cls": label})


def write_vae(out: Path) -> Path:
    """A tiny random AutoencoderKL (2x down, 4 latent channels): cheap enough to encode 100K images."""
    import torch

    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], latent_channels=4,
                        norm_num_groups=4, layers_per_block=1)
    vae.save_pretrained(out / "vae")
    return out / "vae"


def write_latents(root: Path, vae: Path, out: Path) -> float:
    """`ditkit prepare` of the folder; returns its seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ditkit.cli.main", "prepare", str(root), "--vae", str(vae),
                    "--resolution", str(RESOLUTION), "--out", str(out / "latents"), "--no-progress"], check=True)
    return time.perf_counter() - start


def sources(data: Path) -> dict[str, list[str]]:
    """Each source's training overrides."""
    cache = f"data.cache_dir={data / 'cache'}"  # listings and shard indexes: built by the first run
    return {"folder": [f"data.source={data / 'folder'}", cache],
            "datasets (save_to_disk)": [f"data.source={data / 'hf'}", cache],
            "datasets (parquet)": [f"data.source={data / 'parquet'}", cache],
            "WebDataset": [f"data.source={data / 'wds'}", cache],
            "prepared latents": [f"data.source=latents:{data / 'latents'}"]}


# -- one measurement (in a fresh process) ---------------------------------------------------------------
def measure(overrides: list[str], steps: int, loader_batches: int, out_dir: str) -> dict:
    """Train `steps` steps from the source and time its loader alone; in this process."""
    from torch.utils.data import DataLoader

    from ditkit.train import load_config
    from ditkit.train.loop import StepBatchSampler
    from ditkit.train.trainer import Trainer

    imported = time.time()

    cfg = load_config(None, [*MODEL, f"data.resolution={RESOLUTION}", f"train.batch_size={BATCH}",
                             f"train.steps={steps}", f"train.log_every={steps}", f"train.ckpt_every={10 * steps}",
                             "train.num_samples=0", f"train.out_dir={out_dir}", *overrides])
    start = time.perf_counter()
    trainer = Trainer(cfg, progress=False)  # opens the data (lists, indexes, reads a manifest) and builds the model
    opened = time.perf_counter() - start
    first: list[float] = []
    loss = trainer.objective.loss

    def timed_loss(*args, **kwargs):
        value = loss(*args, **kwargs)
        if not first:
            first.append(time.time())
        return value

    trainer.objective.loss = timed_loss
    trainer.train()
    rss, anon, peak = status_mib("VmRSS"), status_mib("RssAnon"), status_mib("VmHWM")
    start = time.perf_counter()
    trainer._prepare_data()  # the same opening again: listings and shard indexes now come from the cache
    reopened = time.perf_counter() - start
    metrics = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    sampler = StepBatchSampler(len(trainer.dataset), BATCH, seed=1, start=0, stop=loader_batches)
    start = time.perf_counter()
    for _ in DataLoader(trainer.dataset, batch_sampler=sampler):
        pass
    loader = loader_batches * BATCH / (time.perf_counter() - start)
    started = float(os.environ["BENCH_T0"])
    return {"items": len(trainer.dataset), "import_s": imported - started, "first_step_s": first[0] - started,
            "open_s": opened, "reopen_s": reopened,
            "rss_mib": rss, "anon_mib": anon, "peak_mib": peak, "loader_items_s": loader,
            "train_items_s": metrics[-1]["samples_per_sec"]}


def run_measurement(overrides: list[str], args, out_dir: Path) -> dict:
    env = {**os.environ, "BENCH_T0": repr(time.time())}
    command = [sys.executable, __file__, "--measure", json.dumps(overrides), "--steps", str(args.steps),
               "--loader-batches", str(args.loader_batches), "--run-dir", str(out_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"status": done.stderr.strip().splitlines()[-1][:120] if done.stderr.strip() else "failed"}
    return {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


def table(rows: list[dict]) -> str:
    lines = [f"Data sources at scale on {rows[0]['device']}: DiT-Nano/4 at {RESOLUTION} px, batch {BATCH}, "
             f"{rows[0]['steps']} training steps, one process.", "",
             "| source | items | open s (again) | first step s (imports) | RSS MiB (anon) | peak MiB "
             "| loader items/s | training items/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        head = f"| {row['source']} | {row['n']:,} |"
        if row["status"] != "ok":
            lines.append(f"{head} {row['status']} | | | | | |")
            continue
        lines.append(f"{head} {row['open_s']:.2f} ({row['reopen_s']:.2f}) | {row['first_step_s']:.1f} "
                     f"({row['import_s']:.1f}) | {row['rss_mib']:.0f} "
                     f"({row['anon_mib']:.0f}) | {row['peak_mib']:.0f} | {row['loader_items_s']:,.0f} | "
                     f"{row['train_items_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--loader-batches", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # the child
        print(json.dumps(measure(json.loads(args.measure), args.steps, args.loader_batches, args.run_dir)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for n in args.sizes:
            data = Path(scratch) / f"n{n}"
            start = time.perf_counter()
            write_folder(data / "folder", n)
            write_hf(data / "folder", data)
            write_tars(data / "folder", data)
            made = time.perf_counter() - start
            prepare_s = write_latents(data / "folder", write_vae(data), data)
            print(f"{n:,} items: sources written in {made:.0f} s, prepared latents in {prepare_s:.0f} s", flush=True)
            for name, overrides in sources(data).items():
                row = run_measurement(overrides, args, data / "runs" / "".join(c for c in name if c.isalnum()))
                rows.append({"source": name, "n": n, "device": device_name("cpu"), "steps": args.steps, **row})
                print(rows[-1], flush=True)
    text = table(rows)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data-startup-cpu.md").write_text(text)
    write_csv(rows, out / "data-startup-cpu.csv")
    print(f"wrote {out / 'data-startup-cpu.md'} and .csv")


if __name__ == "__main__":
    main()
