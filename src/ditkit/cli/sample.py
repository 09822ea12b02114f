"""`ditkit sample`: an image grid from a checkpoint; the upscale chain; patch-parallel under torchrun."""

from __future__ import annotations

from ..checkpoint import load_checkpoint
from ..data.images import save_grid
from ..diffusion.pipeline import UpscaleChain, generate, generate_upscaled
from ..distributed.launch import sampling_session
from ..errors import DitkitError
from ..record import TIMESTEP_SPACINGS, Sampling
from .args import COMMANDS, SharedFlags, check_output_file, optional_size, parse_options, parse_size


def add_parser(sub, shared: SharedFlags) -> None:
    sample = sub.add_parser("sample", help=COMMANDS["sample"],
                            parents=[shared.sampling, shared.seed, shared.mixer, shared.weights, shared.device,
                                     shared.progress])
    sample.add_argument("--ckpt", required=True, help="run folder, checkpoint folder or .safetensors file")
    sample.add_argument("-n", "--num", type=int, default=16,
                        help="number of images (under torchrun write -n: torchrun takes --num for its --numa-binding)")
    sample.add_argument("--labels", help="comma-separated class indices or names, cycled over the grid")
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
    sample.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS,
                        help="ddpm runs: how the steps are spaced (default: the run's; official = DiT's "
                             "space_timesteps respacing and sampler, as the official sample.py)")
    sample.set_defaults(func=run)


def run(args) -> None:
    if args.base_ckpt and not args.upscale_from:
        raise DitkitError("--base-ckpt needs --upscale-from (the size the base checkpoint samples at)")
    check_output_file(args.out, image=True)
    with sampling_session(args.parallel, args.device) as session:  # --parallel patch: one strip per process
        model, record = load_checkpoint(args.ckpt, ema=not args.no_ema, mixer=args.mixer,
                                        mixer_options=parse_options(args.mixer_opt) or None, device=session.device)
        height, width = optional_size(args.resolution)
        asked = Sampling(num=args.num, height=height, width=width, steps=args.steps, cfg_scale=args.cfg,
                         sampler=args.sampler, seed=args.seed, labels=record.class_labels(args.labels, args.num),
                         attention_scale=args.attention_scale, positions=args.position_scaling,
                         timestep_spacing=args.timestep_spacing)
        sampling = record.sampling(asked)  # unset values filled in, for the message below
        model = session.wrap(model)
        if args.upscale_from:  # the chain's base pass takes what `asked` leaves unset from its own run
            images = generate_upscaled(model, record, asked, upscale_chain(args, session.device),
                                       progress=session.is_main and not args.no_progress)
        else:
            images = generate(model, record, asked, progress=session.is_main and not args.no_progress)
        if not session.is_main:  # every process holds the same images; one writes them
            return
    out = save_grid(images, args.out)
    chain = f", upscaled from {args.upscale_from} at strength {args.strength}" if args.upscale_from else ""
    print(f"wrote {out} ({sampling.num} images, {sampling.height}x{sampling.width}{chain})")


def upscale_chain(args, device: str):
    """--upscale-from and its options; --base-ckpt loads another checkpoint for the base size."""
    base_model = base_record = None
    if args.base_ckpt:
        base_model, base_record = load_checkpoint(args.base_ckpt, ema=not args.no_ema, device=device)
    base_height, base_width = parse_size(args.upscale_from)
    return UpscaleChain(base_height=base_height, base_width=base_width, strength=args.strength,
                        base_model=base_model, base_record=base_record, base_steps=args.base_steps)
