"""The `ditkit` command line: info, train, sample, distill, eval, bench, quickstart."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from .. import __version__
from ..errors import DitkitError

BUILTIN_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def parse_size(text: str) -> tuple[int, int]:
    """"256" -> (256, 256); "256x512" -> (256, 512) as height x width."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        raise DitkitError(f"resolution {text!r} is not a size: use e.g. 256 or 256x512 (height x width)")
    return (sizes[0], sizes[-1])


def parse_options(items: list[str]) -> dict:
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise DitkitError(f"mixer option {item!r} is not key=value (e.g. radius=8)")
        options[key] = yaml.safe_load(value)
    return options


def resolve_config(name: str) -> Path:
    """A config path, or the name of a config that ships with ditkit (e.g. `digits`)."""
    path = Path(name)
    if path.is_file():
        return path
    builtin = BUILTIN_CONFIGS / f"{name}.yaml"
    if builtin.is_file():
        return builtin
    shipped = ", ".join(sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml")))
    raise DitkitError(f"config {name!r} is neither a file nor a built-in config ({shipped})")


def cmd_info(args) -> None:
    import torch

    from ..metrics import model_cost
    from ..mixers import MIXERS
    from ..models import NAMED_MODELS, build_model, model_config

    if args.list or not args.model:
        print("models: " + ", ".join(NAMED_MODELS))
        print("mixers: " + ", ".join(sorted(MIXERS)))
        return
    options = parse_options(args.mixer_opt)
    if args.model in NAMED_MODELS:
        overrides = {"mixer": args.mixer} if args.mixer else {}
        config = model_config(args.model, **overrides, **({"mixer_options": options} if options else {}))
        with torch.device("meta"):  # counting needs shapes only: no memory, no init time
            model = build_model(config)
        label, default_resolution = args.model, 256
    elif not Path(args.model).exists():
        names = ", ".join(NAMED_MODELS)
        raise DitkitError(f"unknown model {args.model!r}: choose one of {names}, or a checkpoint path")
    else:
        from ..train.checkpoint import load_checkpoint

        model, record = load_checkpoint(args.model, mixer=args.mixer, mixer_options=options or None)
        label, default_resolution = str(args.model), record["data"]["resolution"]
    from ..diffusion.pipeline import input_size

    height, width = parse_size(args.resolution) if args.resolution else (default_resolution, default_resolution)
    h, w = input_size(model, height, width)
    cfg = model.config
    cost = model_cost(model, h, w)
    space = f"{cfg.in_channels}x{h}x{w} " + (f"latent (VAE /{cfg.vae_scale})" if cfg.vae_scale > 1 else "pixels")
    options = f" {cfg.mixer_options}" if cfg.mixer_options else ""
    tokens = cfg.tokens(h, w)
    print(f"model       {label} ({cfg.backbone}, mixer {cfg.mixer}{options})")
    print(f"input       {height}x{width} px -> {space} -> {tokens} tokens")
    print(f"parameters  {cost.params / 1e6:.2f}M ({cost.params:,})")
    print(f"forward     {cost.macs / 1e9:.2f} GFLOPs, counting one multiply-add as 1 FLOP (the DiT paper's unit);")
    print(f"            {cost.flops / 1e9:.2f} GFLOPs counting it as 2 (one sample, attention and FFTs included)")


def cmd_train(args) -> None:
    from ..train import load_config, train

    cfg = load_config(resolve_config(args.config), args.overrides)
    from accelerate import PartialState

    final = train(cfg, resume=(args.resume if args.resume else None), progress=not args.no_progress)
    if PartialState().is_main_process:
        print(f"done: checkpoint {final}; samples in {Path(cfg.train.out_dir) / 'samples'}")


def cmd_sample(args) -> None:
    from ..data.images import image_grid
    from ..parallel import sampling_session
    from ..train.checkpoint import load_checkpoint

    with sampling_session(args.parallel, args.device) as session:  # --parallel patch: one strip per process
        model, record = load_checkpoint(args.ckpt, ema=not args.no_ema, mixer=args.mixer,
                                        mixer_options=parse_options(args.mixer_opt) or None, device=session.device)
        model = session.wrap(model)
        default = record["data"]["resolution"]
        height, width = parse_size(args.resolution) if args.resolution else (default, default)
        labels = parse_labels(args.labels, record, args.num)
        images = sample_images(args, model, record, height, width, labels, session.device, progress=session.is_main)
        if not session.is_main:  # every process holds the same images; one writes them
            return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(out)
    chain = f", upscaled from {args.upscale_from} at strength {args.strength}" if args.upscale_from else ""
    print(f"wrote {out} ({args.num} images, {height}x{width}{chain})")


def sample_images(args, model, record: dict, height: int, width: int, labels, device: str, progress: bool = True):
    """Plain sampling, or the upscale chain when --upscale-from is given."""
    from ..diffusion.pipeline import generate, generate_upscaled
    from ..train.checkpoint import load_checkpoint

    diffusion = record["diffusion"]
    common = dict(num=args.num, height=height, width=width, steps=args.steps or diffusion["sample_steps"],
                  cfg_scale=diffusion["cfg_scale"] if args.cfg is None else args.cfg, seed=args.seed,
                  sampler=args.sampler or diffusion.get("sampler"), labels=labels,
                  attention_scale=args.attention_scale, positions=args.position_scaling, progress=progress)
    if not args.upscale_from:
        if args.base_ckpt:
            raise DitkitError("--base-ckpt needs --upscale-from (the size the base checkpoint samples at)")
        return generate(model, record, **common)
    base_model, base_record = model, record
    if args.base_ckpt:
        base_model, base_record = load_checkpoint(args.base_ckpt, ema=not args.no_ema, device=device)
    base_height, base_width = parse_size(args.upscale_from)
    base_diffusion = base_record["diffusion"]
    return generate_upscaled(model, record, base_height=base_height, base_width=base_width, strength=args.strength,
                             base_steps=args.base_steps or base_diffusion["sample_steps"],
                             base_cfg_scale=base_diffusion["cfg_scale"] if args.cfg is None else args.cfg,
                             base_model=base_model, base_record=base_record,
                             base_sampler=common["sampler"] if base_record is record else base_diffusion.get("sampler"),
                             **common)


def load_teacher(args, device: str):
    """A ditkit checkpoint, or a diffusers transformer folder (its config.json names a `_class_name`)."""
    import json

    config = Path(args.teacher) / "config.json"
    if config.is_file() and "_class_name" in json.loads(config.read_text()):
        from ..integrations.diffusers import DiffusersTeacher

        return DiffusersTeacher(args.teacher, device=device, resolution=args.resolution,
                                steps=args.teacher_steps or 28, prompt_embeds=args.prompt_embeds, seed=args.seed)
    from ..distill import DitkitTeacher

    if args.prompt_embeds:
        raise DitkitError("--prompt-embeds is for diffusers teachers; a ditkit teacher uses its class labels")
    teacher = DitkitTeacher(args.teacher, device=device)
    teacher.resolution = args.resolution or teacher.resolution
    teacher.steps = args.teacher_steps or teacher.steps
    return teacher


def cmd_distill(args) -> None:
    import torch

    from ..distill import DistillConfig, Distiller, LossWeights

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_teacher(args, device)
    cfg = DistillConfig(
        out_dir=args.out, radius=args.radius, down_factor=args.down_factor, backend=args.backend,
        num_samples=args.num_samples, steps=args.steps, batch_size=args.batch_size, optimizer=args.optimizer,
        lr=args.lr if args.lr is not None else (1.0 if args.optimizer == "prodigy" else 1e-4),
        weights=LossWeights(task=args.task_weight, output=args.output_weight, attention=args.attention_weight),
        attention_every=args.attention_every, seed=args.seed, ckpt_every=args.ckpt_every, eval_num=args.eval_num,
        eval_steps=args.eval_steps)
    agreement = Distiller(teacher, cfg, device=device, progress=not args.no_progress).run(resume=args.resume)
    print(f"student agreement with the teacher on {cfg.eval_num} held-out samples (same noise and conditions):")
    print(f"{'resolution':>10}  {'untuned PSNR':>12}  {'untuned SSIM':>12}  {'student PSNR':>12}  {'student SSIM':>12}")
    for resolution, student in agreement["student"].items():
        untuned = agreement["untuned"][resolution]
        print(f"{resolution:>10}  {untuned['psnr']:>12.2f}  {untuned['ssim']:>12.4f}  "
              f"{student['psnr']:>12.2f}  {student['ssim']:>12.4f}")
    work = ", ".join(f"{res} px {100 * (1 - w):.1f}%" for res, w in agreement["attention_work"].items())
    print(f"image-attention FLOPs saved vs full attention at radius {cfg.radius:g}: {work}")
    print(f"done: student checkpoint in {Path(cfg.out_dir) / 'checkpoints'}; "
          f"report {Path(cfg.out_dir) / 'agreement.json'}, compare-*.png")


def cmd_quickstart(args) -> None:
    import torch

    from ..quickstart import quickstart, quickstart_settings

    settings = quickstart_settings(args.scale, teacher_steps=args.teacher_steps, distill_steps=args.distill_steps)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = quickstart(args.out, settings, device=device, features_path=args.features_path,
                        progress=not args.no_progress)
    print(f"done: open {report}")


def parse_labels(text: str | None, record: dict, num: int):
    import torch

    if text is None:
        return None
    names = record["data"].get("class_names") or []
    labels = []
    for item in text.split(","):
        item = item.strip()
        if item in names:
            labels.append(names.index(item))
        elif item.lstrip("-").isdigit():
            labels.append(int(item))
        else:
            raise DitkitError(f"class {item!r} is neither an index nor a class name ({', '.join(names) or 'none'})")
    return torch.tensor([labels[i % len(labels)] for i in range(num)])


def cmd_eval(args) -> None:
    import json

    import torch

    from ..metrics.quality import evaluate, load_reference, load_samples, sample_checkpoint

    if bool(args.ckpt) == bool(args.samples):
        raise DitkitError("give either --ckpt (a model to sample) or --samples (a folder of generated images)")
    size = parse_size(args.resolution) if args.resolution else None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    record = None
    if args.ckpt:
        images, record = sample_checkpoint(args.ckpt, args.num, resolution=size, steps=args.steps,
                                           cfg_scale=args.cfg, sampler=args.sampler, seed=args.seed,
                                           batch_size=args.batch_size, ema=not args.no_ema, mixer=args.mixer,
                                           mixer_options=parse_options(args.mixer_opt) or None, device=device,
                                           progress=not args.no_progress)
    else:
        images = load_samples(args.samples, args.num, size[0] if size else None)
    if args.save_samples:
        save_images(images, Path(args.save_samples))
    reference = load_reference(args.ref, args.num_ref, resolution=images.shape[-2], seed=args.seed)
    result = evaluate(images, reference, args.features, inception_weights=args.inception_weights,
                      features_path=args.features_path, batch_size=args.batch_size, device=device, seed=args.seed,
                      progress=not args.no_progress)
    result.update(source=str(args.ckpt or args.samples), reference=args.ref)
    if record is not None and reads_its_classes(record, args.features):
        # The digits classifier behind the features tells whether each sample shows the class it was asked for.
        from ..diffusion.pipeline import cycled_labels
        from ..metrics.features import build_features
        from ..metrics.quality import label_accuracy

        classifier = build_features(args.features, features_path=args.features_path, progress=False).to(device)
        labels = cycled_labels(len(images), record["model"]["num_classes"])  # as sample_checkpoint drew them
        result["label_accuracy"] = label_accuracy(classifier, images, labels, args.batch_size)
    if args.pair_with:
        result["agreement"] = paired_agreement(images, args.pair_with)
    print(format_scores(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(strict_json(result), indent=2, allow_nan=False) + "\n")
    print(f"wrote {out}")


def cmd_bench(args) -> None:
    import torch

    from ..metrics.bench import device_name, run_bench, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    title = (f"ditkit bench: {device_name(device)}, float32, batch 1, one forward per sampling step "
             f"(no CFG), median of {args.repeats} after warm-up")
    print(title)
    rows = run_bench(args.models, args.mixers, args.resolutions, mixer_opts=parse_options(args.mixer_opt),
                     max_seconds=args.max_seconds, max_memory_mib=args.max_memory_mib, repeats=args.repeats,
                     device=device, memory=not args.no_memory, progress=False)
    paths = write_report(rows, args.out, stem=args.stem, title=title)
    print("\n" + paths[0].read_text())
    print(f"wrote {', '.join(str(p) for p in paths)}")


def paired_agreement(images, folder: str) -> dict:
    """PSNR/SSIM of each evaluated image against the same-index image of `folder` (sorted by name)."""
    from ..metrics.agreement import agreement
    from ..metrics.quality import load_samples

    others = load_samples(folder, len(images), resolution=images.shape[-2])
    if len(others) < len(images):
        raise DitkitError(f"--pair-with {folder} has {len(others)} images for {len(images)} samples: "
                          "pair folders of equal size (e.g. two --save-samples runs with the same --seed)")
    if others.shape[1] != images.shape[1]:  # folders load as RGB; grayscale samples compare as gray
        others = others.mean(dim=1, keepdim=True) if images.shape[1] == 1 else others
    return agreement(images, others)


def strict_json(value):
    """Non-finite floats (PSNR of identical images is inf) -> null: strict JSON has no Infinity."""
    import math

    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict_json(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def reads_its_classes(record: dict, features: str) -> bool:
    """A class-conditional model of the built-in digits, scored with the digits classifier's features."""
    return (features == "ditkit-digits" and record["data"].get("source") == "digits"
            and record["model"].get("num_classes") == 10)


def format_scores(result: dict) -> str:
    note = ("comparable with published numbers at equal sample counts" if result["comparable_to_papers"]
            else "a ditkit-only scale: compare runs with each other, not with papers")
    return "\n".join([
        f"{result['num_generated']} samples from {result.get('source', '?')} vs {result['num_reference']} "
        f"reference images from {result.get('reference', '?')}",
        f"features    {result['features']} ({note})",
        f"FID         {result['fid']:.3f}",
        f"KID         {result['kid_mean']:.5f} +- {result['kid_std']:.5f} (subsets of {result['kid_subset_size']})",
        f"IS          {result['is_mean']:.3f} +- {result['is_std']:.3f}"]
        + ([f"paired      PSNR {result['agreement']['psnr']:.2f} dB, SSIM {result['agreement']['ssim']:.4f}"]
           if "agreement" in result else [])
        + ([f"legibility  {100 * result['label_accuracy']:.1f}% read by the digits classifier as the class asked for"]
           if "label_accuracy" in result else []))


def save_images(images, folder: Path) -> None:
    from PIL import Image

    from ..data.images import to_uint8

    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(to_uint8(images)):
        Image.fromarray(array[:, :, 0] if array.shape[-1] == 1 else array).save(folder / f"{i:06d}.png")


def add_measure_parsers(sub) -> None:
    """`ditkit eval` and `ditkit bench`."""
    from ..metrics.features import FEATURES

    evaluate = sub.add_parser("eval", help="FID, KID and Inception Score of samples against reference images")
    evaluate.add_argument("--ckpt", help="a checkpoint to sample (run folder, checkpoint folder or .safetensors)")
    evaluate.add_argument("--samples", help="instead of --ckpt: a folder of already generated images")
    evaluate.add_argument("--ref", required=True,
                          help="reference images: a built-in dataset (digits, photos) or an image folder")
    evaluate.add_argument("--num", type=int, default=256, help="images to sample (or to read from --samples)")
    evaluate.add_argument("--num-ref", type=int, default=1000, help="reference images (a random subset)")
    evaluate.add_argument("--features", default="ditkit-digits", choices=FEATURES,
                          help="feature extractor: inception (the standard FID network; needs its weights file) "
                               "or ditkit-digits (offline, trained by ditkit on the built-in digits; not comparable "
                               "with published numbers)")
    evaluate.add_argument("--inception-weights", metavar="PATH", help="the InceptionV3 FID weights file "
                          "(default: look in the torch hub checkpoints folder and ditkit's cache)")
    evaluate.add_argument("--features-path", metavar="PATH", help="where the ditkit-digits extractor is cached "
                          "(default: ~/.cache/ditkit/features/ditkit-digits-v1.pt; trained there on first use)")
    evaluate.add_argument("--resolution", help="sampling size in pixels (default: the training resolution)")
    evaluate.add_argument("--steps", type=int, help="sampling steps (default: the run's diffusion.sample_steps)")
    evaluate.add_argument("--cfg", type=float, help="classifier-free guidance scale (1 = off)")
    evaluate.add_argument("--sampler", help="ddpm or ddim (DDPM models), euler (flow models)")
    evaluate.add_argument("--seed", type=int, default=0, help="seeds the samples, the reference subset and KID")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--mixer", help="swap the token mixer at load time (e.g. clear)")
    evaluate.add_argument("--mixer-opt", action="append", metavar="KEY=VALUE", help="mixer option (repeatable)")
    evaluate.add_argument("--no-ema", action="store_true", help="use the raw training weights, not the EMA")
    evaluate.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    evaluate.add_argument("--save-samples", metavar="DIR", help="also write the evaluated images as PNGs here")
    evaluate.add_argument("--pair-with", metavar="DIR", help="also PSNR/SSIM against the same-index images of DIR "
                          "(e.g. a teacher's samples for the same seed)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluate.add_argument("--out", default="eval.json", help="JSON file for the scores")
    evaluate.set_defaults(func=cmd_eval)

    bench = sub.add_parser("bench", help="parameters, GFLOPs, time per sampling step and peak memory vs resolution")
    bench.add_argument("--models", nargs="+", default=["DiT-S/2", "U-DiT-S"], help="named models (ditkit info --list)")
    bench.add_argument("--mixers", nargs="+", default=["full", "clear", "downsampled"], help="token mixers")
    bench.add_argument("--mixer-opt", action="append", metavar="KEY=VALUE",
                       help="mixer option, given to the mixers that accept it (e.g. radius=8; repeatable)")
    bench.add_argument("--resolutions", nargs="+", type=int, default=[256, 512, 1024, 2048],
                       help="square image sizes in pixels (tokens follow from the VAE scale and patch size)")
    bench.add_argument("--max-seconds", type=float, default=10.0,
                       help="a series stops after a step slower than this ('skipped (budget)')")
    bench.add_argument("--max-memory-mib", type=float, help="a series stops after a step with a higher peak")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per point, after one warm-up")
    bench.add_argument("--threads", type=int, help="CPU threads (default: torch's; 1 is steadier on a busy machine)")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass (one forward less)")
    bench.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    bench.add_argument("--out", default="bench", help="folder for the .md, .csv and .png")
    bench.add_argument("--stem", default="bench", help="file name stem of the outputs")
    bench.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditkit", description="Efficient diffusion backbones for high resolution.")
    parser.add_argument("--version", action="version", version=f"ditkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameters and forward GFLOPs of a named model or a checkpoint")
    info.add_argument("model", nargs="?", help="a named model (e.g. DiT-XL/2) or a checkpoint path")
    info.add_argument("--resolution", help="pixels, e.g. 256 or 256x512 (default: 256, or the checkpoint's)")
    info.add_argument("--mixer", help="token mixer to use instead of the model's")
    info.add_argument("--mixer-opt", action="append", metavar="KEY=VALUE", help="mixer option (repeatable)")
    info.add_argument("--list", action="store_true", help="list the named models and mixers")
    info.set_defaults(func=cmd_info)
    add_measure_parsers(sub)

    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="a YAML file, or a built-in config name (e.g. digits)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100")
    train.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                       help="continue from the latest checkpoint of train.out_dir, or from CKPT")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    sample = sub.add_parser("sample", help="sample an image grid from a checkpoint")
    sample.add_argument("--ckpt", required=True, help="run folder, checkpoint folder or .safetensors file")
    sample.add_argument("--resolution", help="pixels, e.g. 64 or 64x128 (default: the training resolution)")
    sample.add_argument("-n", "--num", type=int, default=16,
                        help="number of images (under torchrun write -n: torchrun takes --num for its --numa-binding)")
    sample.add_argument("--steps", type=int, help="sampling steps (default: the run's diffusion.sample_steps)")
    sample.add_argument("--cfg", type=float, help="classifier-free guidance scale (1 = off)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--sampler", help="ddpm or ddim (DDPM models), euler (flow models)")
    sample.add_argument("--labels", help="comma-separated class indices or names, cycled over the grid")
    sample.add_argument("--mixer", help="swap the token mixer at load time (e.g. clear)")
    sample.add_argument("--mixer-opt", action="append", metavar="KEY=VALUE", help="mixer option (repeatable)")
    sample.add_argument("--no-ema", action="store_true", help="use the raw training weights, not the EMA")
    sample.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    sample.add_argument("--out", default="samples.png", help="output PNG grid")
    sample.add_argument("--parallel", choices=("none", "patch"), default="none",
                        help="patch: under torchrun, each process computes one horizontal strip of the image "
                             "tokens (DiT; exact: same images as one process)")
    sample.add_argument("--upscale-from", metavar="SIZE", help="high-resolution chain (SDEdit): sample at SIZE "
                        "pixels first, upsample to --resolution, noise to --strength and denoise there")
    sample.add_argument("--strength", type=float, default=0.7, help="upscale chain: noise level of the upsampled "
                        "image (0 = returned as is, 1 = plain sampling; runs strength x --steps steps)")
    sample.add_argument("--base-ckpt", help="upscale chain: checkpoint for the base size (default: --ckpt), "
                        "e.g. the full-attention teacher, with the CLEAR student as --ckpt")
    sample.add_argument("--base-steps", type=int, help="upscale chain: sampling steps at the base size")
    sample.add_argument("--attention-scale", action="store_true", help="proportional attention scale "
                        "sqrt(log N / log N_train) beyond the training size (off by default)")
    sample.add_argument("--position-scaling", default="none", choices=["none", "ntk", "interpolate"],
                        help="rescale position frequencies beyond the training size (off by default)")
    sample.set_defaults(func=cmd_sample)

    distill = sub.add_parser("distill", help="CLEAR linearization: distil a full-attention teacher into a "
                                             "local-attention student")
    distill.add_argument("--teacher", required=True, help="ditkit checkpoint, or a diffusers transformer folder")
    distill.add_argument("--radius", type=float, required=True, help="local attention radius in tokens")
    distill.add_argument("--resolution", type=int, help="training resolution in pixels (default: the teacher's; "
                                                        "512 for diffusers teachers)")
    distill.add_argument("--teacher-steps", type=int, help="sampling steps for the teacher's samples "
                                                           "(default: the teacher's own; 28 for diffusers)")
    distill.add_argument("--prompt-embeds", help="diffusers teachers: safetensors with prompt_embeds and "
                                                 "pooled_prompt_embeds (default: random embeddings, for trials)")
    distill.add_argument("--down-factor", type=int, default=0, help="pooled global tokens over f x f blocks (0 = off)")
    distill.add_argument("--backend", default="auto", help="clear backend: auto, reference, tiled, flex")
    distill.add_argument("--num-samples", type=int, default=1024, help="teacher samples to generate and train on")
    distill.add_argument("--steps", type=int, default=500, help="training steps")
    distill.add_argument("--batch-size", type=int, default=32)
    distill.add_argument("--optimizer", default="adamw", help="adamw or prodigy")
    distill.add_argument("--lr", type=float, help="learning rate (default 1e-4; 1.0 for prodigy)")
    distill.add_argument("--task-weight", type=float, default=1.0, help="weight of the teacher's objective")
    distill.add_argument("--output-weight", type=float, default=0.5, help="weight of MSE(student, teacher output)")
    distill.add_argument("--attention-weight", type=float, default=0.5, help="weight of attention-output matching")
    distill.add_argument("--attention-every", type=int, default=1, help="match every k-th attention layer")
    distill.add_argument("--eval-num", type=int, default=8, help="held-out samples for the agreement report")
    distill.add_argument("--eval-steps", type=int, help="sampling steps for the report (default: the teacher's)")
    distill.add_argument("--ckpt-every", type=int, default=250)
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--out", default="runs/distill", help="output folder")
    distill.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                         help="continue from the latest checkpoint in --out, or from CKPT")
    distill.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    distill.add_argument("--no-progress", action="store_true", help="no progress bars")
    distill.set_defaults(func=cmd_distill)
    add_quickstart_parser(sub)
    return parser


def add_quickstart_parser(sub) -> None:
    from ..quickstart import SCALES

    quick = sub.add_parser("quickstart", help="train a digits teacher, distil a CLEAR student, sample, score and "
                                              "benchmark both, and write a report folder (resumable)")
    quick.add_argument("--out", default="runs/quickstart", help="the report folder (run it again to resume)")
    quick.add_argument("--scale", default="default", choices=list(SCALES),
                       help="default (about 7.5 min on 2 CPU cores) or tiny (a 1-layer model: about a minute, "
                            "for trials)")
    quick.add_argument("--teacher-steps", type=int, help="teacher training steps (default 1500)")
    quick.add_argument("--distill-steps", type=int, help="distillation steps (default 300)")
    quick.add_argument("--features-path", metavar="PATH", help="where the ditkit-digits FID extractor is cached "
                       "(default: ~/.cache/ditkit/features/ditkit-digits-v1.pt; trained there on first use)")
    quick.add_argument("--device", help="cpu, cuda, ... for all but training, which (as `ditkit train`) runs on "
                                        "the GPU when there is one (default: cuda when available)")
    quick.add_argument("--no-progress", action="store_true", help="no progress bars")
    quick.set_defaults(func=cmd_quickstart)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DitkitError as error:
        print(f"ditkit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ditkit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
