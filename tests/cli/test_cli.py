import subprocess
import sys

import pytest
from PIL import Image

from ditkit import DitkitError
from ditkit.cli.args import parse_size
from ditkit.cli.main import main
from helpers import run_cli, tiny_run


def test_info_reports_params_and_gflops_with_its_unit(capsys):
    code, out, _ = run_cli(capsys, "info", "DiT-XL/2")
    assert code == 0
    assert "674.83M" in out and "118.62 GFLOPs, counting one multiply-add as 1 FLOP" in out
    assert "237.24 GFLOPs counting it as 2" in out and "256 tokens" in out
    code, out, _ = run_cli(capsys, "info", "DiT-S/2", "--resolution", "512")
    assert "1024 tokens" in out and "pairs" not in out  # full attention saves nothing
    code, out, _ = run_cli(capsys, "info", "DiT-XL/2", "--resolution", "1024", "--mixer", "clear",
                           "--mixer-opt", "radius=8")
    assert "clear scores 4.2% of full attention's (query, key) pairs on the 64x64 token grid (95.8% saved)" in out


def test_info_lists_models_and_mixers(capsys):
    code, out, _ = run_cli(capsys, "info", "--list")
    assert "DiT-XL/2" in out and "mixers: clear, downsampled, full, ssm" in out and "DiffuSSM-XL" in out


@pytest.mark.parametrize("argv,message", [
    (["info", "DiT-Z/2"], "unknown model 'DiT-Z/2'"),
    (["info", "DiT-S/2", "--resolution", "100"], "resolution 100x100 does not fit this model"),
    (["info", "DiT-S/2", "--mixer", "nope"], "unknown mixer 'nope'"),
    (["info", "DiT-S/2", "--resolution", "big"], "is not a size"),
    (["train", "no-such-config"],
     "neither a file nor a built-in config (digits, study-backbones, study-backbones-64, study-distillation)"),
    (["train", "digits", "train.stepz=3"], "config has no key train.stepz"),
])
def test_bad_input_is_one_line_on_stderr(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_train_then_sample_with_a_swapped_mixer(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", "digits", *tiny_run(run), "--no-progress")
    assert code == 0 and "done: checkpoint" in out
    grid = tmp_path / "grid.png"
    code, out, _ = run_cli(capsys, "sample", "--ckpt", str(run), "--resolution", "16x32", "--num", "3", "--steps", "2",
                           "--cfg", "1.5", "--seed", "1", "--labels", "7,3", "--mixer", "full", "--out", str(grid))
    assert code == 0 and "wrote" in out
    assert Image.open(grid).size == (2 + 2 * 34, 2 + 2 * 18)  # 2x2 grid of 16x32 images, 2 px padding
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(run), "--labels", "eleven", "--out", str(grid))
    assert code == 2 and "class 'eleven' is neither an index nor a class name" in err
    code, out, _ = run_cli(capsys, "info", str(run))
    assert code == 0 and "16x16 px -> 1x16x16 pixels -> 16 tokens" in out


def test_parse_size():
    assert parse_size("64") == (64, 64) and parse_size("64x128") == (64, 128)
    with pytest.raises(DitkitError):
        parse_size("0")


def test_console_script_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ditkit.cli.main", "sample", "--ckpt", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("ditkit: error: no checkpoint at") and "Traceback" not in result.stderr


def test_version_is_the_package_version(capsys):
    import ditkit

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"ditkit {ditkit.__version__}"


def test_udit_trains_and_samples_through_the_same_cli(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = tiny_run(run)[4:] + ["model.name=U-DiT-Nano", "model.args.hidden_size=16", "data.resolution=16"]
    code, out, err = run_cli(capsys, "train", "digits", *overrides, "--no-progress")
    assert code == 0, err
    grid = tmp_path / "u.png"
    code, out, err = run_cli(capsys, "sample", "--ckpt", str(run), "--resolution", "24x16", "--num", "2",
                             "--steps", "2", "--out", str(grid))
    assert code == 0, err
    assert Image.open(grid).size == (2 + 2 * 18, 2 + 26)
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(run), "--resolution", "20", "--out", str(grid))
    assert code == 2 and "multiples of 8" in err


def test_diffussm_trains_and_samples_through_the_same_cli(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = tiny_run(run)[4:] + ["model.name=DiffuSSM-Nano", "model.args.depth=1", "model.args.hidden_size=16",
                                     "model.args.state_size=8"]
    code, out, err = run_cli(capsys, "train", "digits", *overrides, "--no-progress")
    assert code == 0, err
    grid = tmp_path / "s.png"  # trained at 16x16, sampled at 12x20 (another length L)
    code, out, err = run_cli(capsys, "sample", "--ckpt", str(run), "--resolution", "12x20", "--num", "2",
                             "--steps", "2", "--out", str(grid))
    assert code == 0, err
    assert Image.open(grid).size == (2 + 2 * 22, 2 + 14)
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(run), "--resolution", "15", "--out", str(grid))
    assert code == 2 and "must be positive multiples of 2" in err and err.count("\n") == 1
    code, out, _ = run_cli(capsys, "info", str(run))
    assert code == 0 and "mixer ssm" in out and "256 tokens" in out
