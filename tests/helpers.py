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
