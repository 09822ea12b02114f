"""Nothing lost, ever (issue 16), from the command line: options and overrides in any order, output
paths checked before any work, and distillation folders owned like training folders."""

import json
import re

import pytest

from helpers import run_cli, tiny_run


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
    import ditkit.cli.sample as sample_cli  # patched where it is called: importing it under the patch kept it

    (tmp_path / "taken").write_text("")
    monkeypatch.setattr(sample_cli, "generate", lambda *args, **kwargs: pytest.fail("sampled before the check"))
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / out))
    assert code == 2 and message in err and err.count("\n") == 1


def test_eval_checks_its_outputs_before_sampling(tiny_ckpt, tmp_path, capsys, monkeypatch):
    import ditkit.metrics.score as score  # patched where it is called: importing it under the patch kept it

    (tmp_path / "taken").write_text("")
    monkeypatch.setattr(score, "sample_checkpoint", lambda *args, **kwargs: pytest.fail("sampled before the check"))
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


# ---------------------------------------------------------------- issue 27: nothing ditkit did not write is lost

def tree(folder):
    """Every file under `folder` with its bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run_copy(tiny_ckpt, tmp_path):
    import shutil

    return shutil.copytree(tiny_ckpt, tmp_path / "run")


def test_eval_refuses_a_features_path_that_is_a_checkpoint(run_copy, capsys):
    ema = sorted((run_copy / "checkpoints").glob("step_*"))[-1] / "ema.safetensors"
    before = tree(run_copy)
    code, _, err = run_cli(capsys, "eval", "--ckpt", str(run_copy), "--ref", "digits", "--num", "2", "--num-ref", "4",
                           "--steps", "1", "--features-path", str(ema), "--out", str(run_copy.parent / "e.json"),
                           "--no-progress")
    assert code == 2 and "is not a ditkit-digits feature cache" in err and err.count("\n") == 1
    assert tree(run_copy) == before


@pytest.mark.parametrize("teacher,out", [("run", "run"), ("run/checkpoints", "run"), ("run", "run/student")])
@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_distill_refuses_an_output_folder_over_its_teacher_before_any_write(run_copy, capsys, teacher, out, flag):
    root = run_copy.parent
    before = tree(run_copy)
    code, _, err = run_cli(capsys, "distill", "--teacher", str(root / teacher), "--radius", "2", "--steps", "1",
                           "--num-samples", "4", "--out", str(root / out), flag, "--no-progress")
    assert code == 2 and err.count("\n") == 1
    assert f"output folder {root / out} " in err and f"the teacher {root / teacher}" in err and "outside" in err
    assert tree(run_copy) == before and not (root / "run" / "student").exists()


def test_distill_refuses_to_overwrite_a_training_run_it_does_not_read(tiny_ckpt, run_copy, capsys):
    before = tree(run_copy)
    code, _, err = run_cli(capsys, "distill", "--teacher", str(tiny_ckpt), "--radius", "2", "--steps", "1",
                           "--num-samples", "4", "--out", str(run_copy), "--overwrite", "--no-progress")
    assert code == 2 and "holds a `ditkit train` run" in err and err.count("\n") == 1
    assert tree(run_copy) == before


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_train_never_removes_files_it_did_not_write(tmp_path, capsys, flags):
    folder = tmp_path / "mine"
    (folder / "samples").mkdir(parents=True)
    (folder / "config.json").write_text('{"mine": true}')
    (folder / "samples" / "holiday.png").write_bytes(b"holiday")
    code, _, err = run_cli(capsys, "train", "digits", *tiny_run(folder, "train.steps=1"), *flags, "--no-progress")
    assert code == 2 and "holds files that ditkit did not write (config.json, samples)" in err
    assert err.count("\n") == 1
    assert tree(folder) == {"config.json": b'{"mine": true}', "samples/holiday.png": b"holiday"}


def test_overwrite_removes_only_what_ditkit_recorded_writing(run_copy, capsys):
    (run_copy / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "train", "digits", *tiny_run(run_copy, "train.steps=1"), "--overwrite",
                           "--no-progress")
    assert code == 0, err
    assert (run_copy / "notes.txt").read_text() == "mine"
    assert json.loads((run_copy / ".ditkit-run.json").read_text())["command"] == "ditkit train"


def test_a_run_folder_from_before_the_ownership_record_resumes_and_overwrites(run_copy, capsys):
    (run_copy / ".ditkit-run.json").unlink(missing_ok=True)
    (run_copy / "notes.txt").write_text("mine")
    code, out, err = run_cli(capsys, "train", "digits", "--resume", *tiny_run(run_copy), "--no-progress")
    assert code == 0 and "resuming from" in out, err
    (run_copy / ".ditkit-run.json").unlink()
    code, _, err = run_cli(capsys, "train", "digits", *tiny_run(run_copy, "train.steps=1"), "--overwrite",
                           "--no-progress")
    assert code == 0, err
    assert [json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (run_copy / "notes.txt").read_text() == "mine"


def test_convert_refuses_a_folder_that_is_not_new(run_copy, tmp_path, capsys):
    from convert.test_official_dit import official_state

    torch = pytest.importorskip("torch")
    torch.save(official_state(depth=1, width=64, classes=10, side=8), tmp_path / "good.pt")
    convert = ["convert", str(tmp_path / "good.pt"), "--num-heads", "4", "--resolution", "16", "--out"]
    before = tree(run_copy)
    code, _, err = run_cli(capsys, *convert, str(run_copy))
    assert code == 2 and f"{run_copy} exists and is not empty" in err and err.count("\n") == 1
    assert tree(run_copy) == before
    assert run_cli(capsys, *convert, str(tmp_path / "converted"))[0] == 0
    first = tree(tmp_path / "converted")
    code, _, err = run_cli(capsys, *convert, str(tmp_path / "converted"))
    assert code == 2 and "exists and is not empty" in err and tree(tmp_path / "converted") == first


def test_quickstart_refuses_a_training_run_folder(run_copy, monkeypatch):
    from ditkit import DitkitError
    from ditkit.study import quickstart as quickstart_module
    from ditkit.study.stages import StageRunner

    def never(*_):
        raise AssertionError("the quickstart ran in a training run's folder")

    monkeypatch.setattr(StageRunner, "run", never)
    before = tree(run_copy)
    with pytest.raises(DitkitError, match="holds a `ditkit train` run: give `ditkit quickstart` another output"):
        quickstart_module.quickstart(run_copy, log=lambda _: None)
    assert tree(run_copy) == before


def test_train_refuses_an_output_folder_inside_its_image_folder(tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "images"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (60 * i, 90, 30)).save(data / label / f"{i}.png")
    before = tree(data)
    code, _, err = run_cli(capsys, "train", "digits", *tiny_run(data / "run"), f"data.source={data}",
                           "--no-progress")
    assert code == 2 and err.count("\n") == 1
    assert f"the data.source {data}" in err and "outside" in err and tree(data) == before


@pytest.mark.parametrize("argv,message", [
    (["eval", "--ref", "digits", "--batch-size", "0", "--num", "2"], "--batch-size must be at least 1, got 0"),
    (["bench", "--resolutions", "0", "--models", "DiT-S/2"], "--resolutions must be at least 1, got 0"),
    (["bench", "--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["sample", "--device", "cuda"], "--device cuda: this torch .* cannot use cuda"),
    (["sample", "--device", "gpu"], "--device 'gpu' is not a device torch knows"),
])
def test_impossible_options_are_one_line_before_any_work(tiny_ckpt, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # as on a CPU-only torch
    ckpt = ["--ckpt", str(tiny_ckpt)] if argv[0] in ("eval", "sample") else []
    code, _, err = run_cli(capsys, *argv, *ckpt, "--out", str(tmp_path / "out.png" if argv[0] == "sample" else
                                                            tmp_path / "out"))
    assert code == 2 and re.search(message, err) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("argv,message", [
    (["convert", "{pt}", "--num-heads", "3", "--resolution", "16", "--out", "{out}"],
     "num_heads=3 does not divide model.args.hidden_size=64 .*use num_heads=2"),
    (["convert", "{pt}", "--num-heads", "4", "--resolution", "16", "--out", "{file}"], "is a file: give a new folder"),
    (["export", "{ckpt}", "{file}"], "is a file: give a new folder"),
])
def test_convert_and_export_refuse_impossible_options_before_writing(tiny_ckpt, tmp_path, capsys, argv, message):
    import torch

    from convert.test_official_dit import official_state

    torch.save(official_state(depth=1, width=64, classes=10, side=8), tmp_path / "good.pt")
    (tmp_path / "file").write_text("mine")
    paths = {"pt": tmp_path / "good.pt", "out": tmp_path / "out", "file": tmp_path / "file", "ckpt": tiny_ckpt}
    code, _, err = run_cli(capsys, *[item.format(**paths) for item in argv])
    assert code == 2 and re.search(message, err) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and (tmp_path / "file").read_text() == "mine"
