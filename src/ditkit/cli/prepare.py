"""`ditkit prepare`: a data source encoded once by a VAE into memory-mappable latent shards plus a
manifest (`data.prepared`), for training with `data.source: latents:DIR`. Under torchrun every process
encodes its own shards (gloo on CPU, NCCL on GPUs); the shards are the same whatever the number of
processes, a killed run continues from its finished shards, and a finished folder is verified."""

from __future__ import annotations

from functools import partial

from ..data import build_dataset
from ..data.prepared import DTYPES, PREFIX, prepare_latents
from ..distributed.launch import process_group, torchrun_processes
from ..errors import DitkitError
from ..metrics.shards import agreed
from .args import COMMANDS, SharedFlags


def add_parser(sub, shared: SharedFlags) -> None:
    prepare = sub.add_parser("prepare", help=COMMANDS["prepare"], parents=[shared.device, shared.progress])
    prepare.add_argument("source", help="the images: an image folder (one subfolder per class), a datasets "
                         "save_to_disk folder, parquet files, WebDataset tar shards, or a built-in dataset")
    prepare.add_argument("--vae", required=True, metavar="PATH", help="a local diffusers AutoencoderKL folder")
    prepare.add_argument("--resolution", type=int, required=True, metavar="R", help="image side in pixels (DiT's "
                         "center crop); the latents are R / the VAE's downsampling on a side")
    prepare.add_argument("--out", required=True, metavar="DIR", help="the folder of shards and manifest.json; a "
                         "rerun continues an unfinished one and verifies a finished one")
    prepare.add_argument("--hflip", action="store_true", help="also encode every image mirrored (item 2j+1 is "
                         "the flip of item 2j), as DiT's training flips")
    prepare.add_argument("--dtype", default="fp32", help="storage type of the latents: "
                         f"{' or '.join(DTYPES)} (fp16 halves the disk and reads; training reads them as fp32)")
    prepare.add_argument("--shard-size", type=int, default=1024, metavar="N", help="source items per shard, a "
                         "multiple of --batch-size")
    prepare.add_argument("--batch-size", type=int, default=32, metavar="B", help="images per VAE forward (the "
                         "latents depend on it slightly: it is recorded and a rerun must use the same)")
    prepare.add_argument("--image-column", default="image", help="datasets / parquet sources: the image column")
    prepare.add_argument("--label-column", default="label", help="datasets / parquet sources: the label column "
                         "(WebDataset: the key of a .json label)")
    prepare.add_argument("--labels-file", metavar="FILE", help="class names, line i naming label i, for sources "
                         "without their own (no ClassLabel feature)")
    prepare.add_argument("--cache-dir", metavar="DIR", help="where folder listings and shard indexes are kept "
                         "(default ~/.cache/ditkit)")
    prepare.set_defaults(func=run)


def run(args) -> None:
    if args.source.startswith(PREFIX):
        raise DitkitError(f"{args.source} is prepared latents already: give the images (an image folder) as SOURCE")
    if args.resolution < 1:
        raise DitkitError(f"--resolution must be a positive number of pixels, got {args.resolution}")
    source = build_dataset(args.source, args.resolution, cache_dir=args.cache_dir, image_column=args.image_column,
                           label_column=args.label_column, labels_file=args.labels_file)
    with process_group(args.device, join=torchrun_processes() > 1) as processes:
        manifest = prepare_latents(
            source, args.vae, args.out, source_name=args.source, resolution=args.resolution, hflip=args.hflip,
            dtype=args.dtype, shard_size=args.shard_size, batch_size=args.batch_size, device=processes.device,
            rank=processes.rank, world_size=processes.world_size, agree=partial(agreed, processes),
            progress=not args.no_progress)
        if processes.is_main:
            skipped = f", {len(manifest['skipped'])} unreadable file(s) skipped" if manifest["skipped"] else ""
            print(f"prepared {manifest['items']} latent items ({manifest['count']} images"
                  f"{', with their flips' if manifest['hflip'] else ''}) in {len(manifest['shards'])} shard(s)"
                  f"{skipped}: {args.out}; train with data.source=latents:{args.out}")
