"""Nothing lost, ever (issue 16), from the command line: options and overrides in any order, output
paths checked before any work, and distillation folders owned like training folders."""

import json

import pytest

from helpers import run_cli, tiny_run


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from ditkit.cli.main import main

    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "digits", *tiny_run(run, "train.steps=2"), "--no-progress"]) == 0
    return run


def test_options_may_come_before_overrides_and_resume_takes_no_override(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "digits", "--no-progress", *tiny_run(run, "train.steps=2"))
    assert code == 0, err
    code, out, err = run_cli(capsys, "train", "digits", "--resume", *tiny_run(run), "--no-progress")
    assert code == 0, err
    assert "resuming from" in out and "step_0000002" in out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_train_refuses_a_previous_run_in_one_line_and_overwrite_replaces_it(tiny_ckpt, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_ckpt, run)
    code, _, err = run_cli(capsys, "train", "digits", *tiny_run(run), "--no-progress")
    assert code == 2 and "holds a previous run" in err and "--overwrite" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "train", "digits", *tiny_run(run, "train.steps=1"), "--overwrite", "--no-progress")
    assert code == 0, err
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.parametrize("out,message", [
    ("grid.txt", "has no image extension PIL can write"),
    ("taken/grid.png", "taken is a file, not a folder"),
    (".", "is a folder: give a file name"),
])
def test_sample_checks_its_output_before_sampling(tiny_ckpt, tmp_path, capsys, monkeypatch, out, message):
    import ditkit.diffusion.pipeline as pipeline

    (tmp_path / "taken").write_text("")
    monkeypatch.setattr(pipeline, "generate", lambda *args, **kwargs: pytest.fail("sampled before the check"))
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / out))
    assert code == 2 and message in err and err.count("\n") == 1


def test_eval_checks_its_outputs_before_sampling(tiny_ckpt, tmp_path, capsys, monkeypatch):
    import ditkit.metrics.quality as quality

    (tmp_path / "taken").write_text("")
    monkeypatch.setattr(quality, "sample_checkpoint", lambda *args, **kwargs: pytest.fail("sampled before the check"))
    for flags in (["--out", str(tmp_path / "taken" / "eval.json")], ["--save-samples", str(tmp_path / "taken" / "s")]):
        code, _, err = run_cli(capsys, "eval", "--ckpt", str(tiny_ckpt), "--ref", "digits", *flags)
        assert code == 2 and "taken is a file, not a folder" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "eval", "--ckpt", str(tiny_ckpt), "--ref", "digits", "--num", "0")
    assert code == 2 and "number of images must be at least 1" in err


def test_a_huge_mixer_radius_is_a_number_and_samples(tiny_ckpt, tmp_path, capsys):
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(tiny_ckpt), "--mixer", "clear", "--mixer-opt", "radius=1e9",
                           "-n", "1", "--steps", "1", "--out", str(tmp_path / "g.png"))
    assert code == 0 and (tmp_path / "g.png").is_file(), err


def test_sampling_with_a_sampler_that_does_not_fit_is_refused_before_sampling(tiny_ckpt, tmp_path, capsys):
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(tiny_ckpt), "--sampler", "ddim",
                           "--out", str(tmp_path / "g.png"))
    assert code == 2 and "sampler 'ddim' does not fit the flow objective" in err and not (tmp_path / "g.png").exists()


def test_distill_folders_are_owned_like_training_folders(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "student"
    flags = ["--teacher", str(tiny_ckpt), "--radius", "2", "--num-samples", "4", "--batch-size", "2", "--eval-num", "1",
             "--eval-steps", "1", "--out", str(out), "--no-progress"]
    assert run_cli(capsys, "distill", *flags, "--steps", "1")[0] == 0
    code, _, err = run_cli(capsys, "distill", *flags, "--steps", "2")
    assert code == 2 and "holds a previous run" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "distill", *flags, "--steps", "2", "--resume")
    assert code == 0, err
    from ditkit.files import FolderLock

    with FolderLock(out, "another distill"):
        code, _, err = run_cli(capsys, "distill", *flags, "--steps", "2", "--overwrite")
    assert code == 2 and "is in use by process" in err


def test_a_truncated_quickstart_settings_file_is_one_line(tmp_path):
    from ditkit import DitkitError
    from ditkit.study.stages import StageRunner

    (tmp_path / "quickstart.json").write_text('{"teacher_steps": 4, "dis')
    with pytest.raises(DitkitError, match="quickstart settings file .*quickstart.json is not valid JSON"):
        StageRunner(tmp_path, "quickstart").check_settings({"teacher_steps": 4})
