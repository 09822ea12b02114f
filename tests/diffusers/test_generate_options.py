"""`ditkit generate` refuses bad options in one line, before the pipeline loads where the option
alone says it is wrong (issue 27 items 5 and 12): nothing silent (a black image, a wrong size, the
pipeline's default instead of what was asked), no traceback."""

import pytest
import torch
from safetensors.torch import save_file

from ditkit.diffusers import pipelines
from helpers import run_cli
from tiny_diffusers import flux_pipeline


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    torch.manual_seed(0)
    flux_pipeline(encoders=False).save_pretrained(root / "flux")
    save_file({"prompt_embeds": torch.randn(1, 6, 32), "pooled_prompt_embeds": torch.randn(1, 32)},
              root / "embeds.safetensors")
    return root


def generate_args(root, out, *options):
    return ["generate", "--pipeline", str(root / "flux"), "--prompt-embeds", str(root / "embeds.safetensors"),
            "--height", "32", "--width", "32", "--steps", "1", "--dtype", "fp32", "--device", "cpu", "--no-progress",
            "--out", str(out), *options]


def one_line(code, err, expected):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ditkit: error: "), err
    assert expected in lines[0], err


BEFORE_LOADING = {  # options -> what the one line says
    ("--guidance", "nan"): "guidance must be a finite number >= 0",
    ("--guidance", "-1"): "guidance must be a finite number >= 0",
    ("--height", "0"): "height must be a whole number of at least 1",
    ("--height", "-32"): "height must be a whole number of at least 1",
    ("--steps", "0"): "steps must be at least 1",
    ("--num", "0"): "num must be a whole number of at least 1",
    ("--upscale-from", "64"): "is larger than the target 32x32",
    ("--upscale-from", "16x48"): "is larger than the target 32x32",
    ("--clear", "radius=abc"): "radius",
}


@pytest.mark.parametrize("options", BEFORE_LOADING, ids=lambda options: " ".join(options))
def test_a_bad_option_is_one_line_before_the_pipeline_loads(flux, tmp_path, capsys, monkeypatch, options):
    monkeypatch.setattr(pipelines, "load_pipeline", lambda *args, **kwargs: pytest.fail("loaded before the check"))
    code, _, err = run_cli(capsys, *generate_args(flux, tmp_path / "image.png", *options))
    one_line(code, err, BEFORE_LOADING[options])
    assert not (tmp_path / "image.png").exists()


@pytest.mark.parametrize("out,expected", [("image.jpg", "give a name ending in .png"),
                                          ("folder.png", "is a folder: give a file name")])
def test_an_output_generate_cannot_write_is_refused_before_loading(flux, tmp_path, capsys, monkeypatch, out, expected):
    (tmp_path / "folder.png").mkdir()
    monkeypatch.setattr(pipelines, "load_pipeline", lambda *args, **kwargs: pytest.fail("loaded before the check"))
    one_line(*run_cli(capsys, *generate_args(flux, tmp_path / out))[::2], expected)


def garbled_index(root):
    (root / "flux" / "model_index.json").write_text("{ not json")


def empty_embeddings(root):
    (root / "embeds.safetensors").write_bytes(b"garbage, not safetensors")


def narrow_embeddings(root):
    save_file({"prompt_embeds": torch.randn(1, 6, 7), "pooled_prompt_embeds": torch.randn(1, 32)},
              root / "embeds.safetensors")


@pytest.mark.parametrize("damage,expected", [(garbled_index, "model_index.json"),
                                             (empty_embeddings, "embeds.safetensors"),
                                             (narrow_embeddings, "width")])
def test_a_damaged_input_is_one_line(flux, tmp_path, capsys, damage, expected):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(flux, root)
    damage(root)
    one_line(*run_cli(capsys, *generate_args(root, tmp_path / "image.png"))[::2], expected)
    assert not (tmp_path / "image.png").exists()


def test_a_student_with_non_finite_weights_is_refused_not_drawn_black(flux, tmp_path, capsys):
    from ditkit.cli.main import main

    student = tmp_path / "student"
    assert main(["distill", "--teacher", str(flux / "flux" / "transformer"), "--radius", "1", "--resolution", "32",
                 "--teacher-steps", "1", "--num-samples", "2", "--steps", "1", "--batch-size", "2", "--eval-num", "1",
                 "--out", str(student), "--no-progress"]) == 0
    capsys.readouterr()
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = sorted((student / "checkpoints").glob("step_*"))[-1]
    for file in weights.glob("*.safetensors"):  # NaN written with the file's own metadata, checksums included
        with safe_open(str(file), framework="pt") as opened:
            metadata = opened.metadata()
        tensors = load_file(file)
        first = sorted(tensors)[0]
        tensors[first] = torch.full_like(tensors[first], float("nan"))
        save_file(tensors, file, metadata=metadata)
    code, _, err = run_cli(capsys, *generate_args(flux, tmp_path / "image.png", "--student", str(student)))
    one_line(code, err, "NaN")
    assert not (tmp_path / "image.png").exists()
