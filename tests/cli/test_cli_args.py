"""The thin CLI: shared flags parse the same everywhere, impossible settings fail before any work,
and `ditkit distill` reads a config file + key=value like `ditkit train`."""

import pytest

from ditkit.cli.args import mixer_spec, parse_options, split_config_and_overrides
from ditkit.cli.main import build_parser
from ditkit.distill import DistillConfig, LossWeights
from ditkit.train import load_config
from helpers import run_cli, tiny_run


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from ditkit.cli.main import main

    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "digits", *tiny_run(run), "--no-progress"]) == 0
    return run


def test_shared_flags_mean_the_same_in_every_command():
    parser = build_parser()
    for argv in (["sample", "--ckpt", "x"], ["eval", "--ckpt", "x", "--ref", "digits"]):
        args = parser.parse_args([*argv, "--device", "cpu", "--mixer", "clear", "--mixer-opt", "radius=3",
                                  "--no-ema", "--steps", "4", "--cfg", "2", "--sampler", "euler", "--no-progress"
                                  if argv[0] == "eval" else "--seed=0"])
        assert (args.device, args.mixer, args.mixer_opt, args.no_ema) == ("cpu", "clear", ["radius=3"], True)
        assert (args.steps, args.cfg, args.sampler) == (4, 2.0, "euler")


@pytest.mark.parametrize("flags,name,options", [
    (["--mixer", "clear:radius=8,down_factor=4"], "clear", {"radius": 8, "down_factor": 4}),
    (["--mixer", "clear:radius=8,down_factor=4", "--mixer-opt", "radius=3"], "clear", {"radius": 3, "down_factor": 4}),
    (["--mixer-opt", "radius=3", "--mixer", "clear:radius=8"], "clear", {"radius": 3}),  # --mixer-opt wins
    (["--mixer", "full", "--mixer", "clear:radius=2"], "clear", {"radius": 2}),  # the last --mixer
])
def test_a_mixer_spec_flag_merges_with_mixer_opt(flags, name, options):
    from ditkit.mixers import MixerSpec

    args = build_parser().parse_args(["sample", "--ckpt", "x", *flags])
    assert (args.mixer, parse_options(args.mixer_opt)) == (name, options)  # what the commands read
    assert mixer_spec(args) == MixerSpec(name, options)


def test_a_bad_mixer_spec_flag_is_one_line_when_the_command_reads_it(tiny_ckpt, capsys):
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(tiny_ckpt), "--mixer", "clear:radius=8,rad=2")
    assert code == 2 and "mixer 'clear' has no option rad: it accepts" in err and err.count("\n") == 1


def test_mixer_option_numbers_are_numbers_even_where_yaml_reads_a_string():
    assert parse_options(["radius=1e9", "down_factor=2", "backend=tiled"]) == {
        "radius": 1e9, "down_factor": 2, "backend": "tiled"}


@pytest.mark.parametrize("extra,message", [
    (["--num", "0"], "number of images must be at least 1"),
    (["-n", "-2"], "number of images must be at least 1"),
    (["--steps", "0"], "steps must be a whole number of at least 1"),
    (["--cfg", "nan"], "cfg must be a finite number"),
    (["--cfg", "-2"], "cfg must be a finite number at least 0 (0 = unconditional, 1 = no guidance"),
    (["--strength", "1.5", "--upscale-from", "8"], "strength must be between 0 and 1"),
])
def test_impossible_sampling_settings_fail_in_one_line_before_sampling(tiny_ckpt, tmp_path, capsys, extra, message):
    out = tmp_path / "never.png"
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(tiny_ckpt), "--out", str(out), *extra)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


def test_distill_positionals_are_an_optional_config_then_overrides():
    assert split_config_and_overrides(["d.yaml", "steps=3"]) == ("d.yaml", ["steps=3"])
    assert split_config_and_overrides(["steps=3"]) == (None, ["steps=3"])
    assert split_config_and_overrides([]) == (None, [])


def test_distill_config_file_then_flags_then_overrides(tmp_path):
    path = tmp_path / "distill.yaml"
    path.write_text("teacher: runs/t\nradius: 4\nsteps: 10\noptimizer: prodigy\nweights: {attention: 0.25}\n")
    cfg = load_config(path, ["steps=30"], kind=DistillConfig, settings={"steps": 20, "batch_size": 8})
    assert (cfg.teacher, cfg.radius, cfg.steps, cfg.batch_size) == ("runs/t", 4.0, 30, 8)
    assert cfg.weights.attention == 0.25 and cfg.weights.output == LossWeights().output  # unset: the default
    assert cfg.lr == 1.0  # Prodigy's default learning rate lives in DistillConfig
    assert DistillConfig().lr == 1e-4


@pytest.mark.parametrize("argv,message", [
    (["distill", "radius=2"], "no teacher: give --teacher PATH"),
    (["distill", "--teacher", "t", "radious=2"], "config has no key radious"),
])
def test_distill_config_mistakes_are_one_line(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1


def test_distill_from_a_config_file(tiny_ckpt, tmp_path, capsys):
    config = tmp_path / "distill.yaml"
    config.write_text(f"teacher: {tiny_ckpt}\nradius: 2\nnum_samples: 4\nbatch_size: 2\neval_num: 1\n"
                      f"eval_steps: 1\nout_dir: {tmp_path / 'student'}\n")
    code, out, _ = run_cli(capsys, "distill", str(config), "steps=1", "--no-progress")
    assert code == 0 and "student PSNR" in out
    saved = (tmp_path / "student" / "distill.json").read_text()
    assert '"steps": 1' in saved and '"radius": 2.0' in saved
