"""Shared test helpers."""

TINY_MODEL = ["model.name=DiT-Nano/4", "model.args.depth=1", "model.args.hidden_size=32", "model.args.num_heads=2"]


def tiny_run(out_dir, *overrides):
    """Overrides for a training run that takes a second on CPU."""
    return [*TINY_MODEL, f"train.out_dir={out_dir}", "data.resolution=16", "train.batch_size=4", "train.steps=4",
            "train.log_every=1", "train.sample_every=1000", "train.ckpt_every=2", "train.num_samples=4",
            "diffusion.sample_steps=2", "train.lr=1e-3", *overrides]


def run_cli(capsys, *argv):
    """Run `ditkit ARGV` in-process; (exit code, stdout, stderr)."""
    from ditkit.cli.main import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


TINY_BACKBONES = {  # backbone -> (named model, field overrides): the smallest model of each that runs every path
    "dit": ("DiT-Nano/2", dict(depth=2, hidden_size=32, num_heads=2)),
    "udit": ("U-DiT-Nano", dict(hidden_size=16, num_heads=2, depths=(1, 1, 2, 1, 1))),
    "diffussm": ("DiffuSSM-Nano", dict(depth=2, hidden_size=32, state_size=8)),
}


def tiny_backbone(backbone="dit", *, randomize=0.0, **overrides):
    """A tiny model of `backbone` (dit, udit, diffussm): 3 pixel channels, 5 classes, random init.
    `backbone` may also be a named model ("DiT-XL/2"): it keeps its own patch, hourglass and so on,
    with the widths and depths of its backbone's tiny model.

    randomize > 0 adds noise of that size to every weight, breaking the zero init (adaLN-Zero makes
    every block start as the identity) so that every path contributes to the output."""
    import torch

    from ditkit.models import NAMED_MODELS, build_model, model_config

    if backbone in NAMED_MODELS:
        name, fields = backbone, TINY_BACKBONES[NAMED_MODELS[backbone][0]][1]
    else:
        name, fields = TINY_BACKBONES[backbone]
    model = build_model(model_config(name, **{"in_channels": 3, "num_classes": 5, "vae_scale": 1, **fields,
                                              **overrides}))
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * randomize)
    return model
