"""A study's distillation arm measured before training (eval.at 0: the student as swapped in) and at 2x
through the upscale chain (eval.chain_strength), with PSNR/SSIM against the teacher at every point."""

import csv

import pytest
import torch
import yaml

from ditkit.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_DIT = ["model.args.depth=1", "model.args.hidden_size=32", "model.args.num_heads=2"]
STUDY = {
    "title": "tiny distillation", "seeds": [0], "budget": {"steps": 2},
    "train_overrides": ["data.resolution=16", "train.batch_size=4", "train.log_every=1", "train.num_samples=0",
                        "diffusion.sample_steps=2", *TINY_DIT],
    "distill": {"num_samples": 4, "batch_size": 2, "eval_num": 2, "radius": 1},
    "eval": {"at": [0, 1.0], "num": 4, "num_reference": 8, "bench_repeats": 1, "scales": [1, 2],
             "chain_strength": 0.5},
    "arms": {"teacher": {"train": "digits", "budget": {"steps": 3}}, "student": {"teacher": "teacher"}},
}


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, digits_features_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture, which a module-scoped fixture cannot use
    folder = tmp_path_factory.mktemp("distill-study")
    config = folder / "study.yaml"
    config.write_text(yaml.safe_dump(STUDY))
    code = main(["study", str(config), "--out", str(folder / "run"), "--features-path", str(digits_features_path),
                 "--no-progress"])
    torch.set_num_threads(threads)
    assert code == 0
    with (folder / "run" / "report" / "measurements.csv").open() as f:
        return folder / "run", list(csv.DictReader(f))


def test_the_untrained_student_is_measured_at_step_0_and_the_teacher_skips_it(study_run):
    _, rows = study_run
    points = {(r["arm"], r["step"], r["resolution"]) for r in rows}
    assert points == {("teacher", "3", "16"), ("teacher", "3", "32"), ("student", "0", "16"),
                      ("student", "0", "32"), ("student", "2", "16"), ("student", "2", "32")}
    student = [r for r in rows if r["arm"] == "student"]
    assert all(r["psnr"] and r["ssim"] for r in student)  # paired with the teacher at 1x and through the chain
    assert all(float(r["train_gflops"]) == 0 for r in student if r["step"] == "0")


def test_the_untrained_student_is_the_teacher_with_clear_attention(study_run):
    out, rows = study_run
    untrained = next(r for r in rows if r["arm"] == "student" and r["step"] == "0" and r["resolution"] == "16")
    agreement = yaml.safe_load((out / "arms" / "student" / "seed-0" / "run" / "agreement.json").read_text())
    assert float(untrained["psnr"]) == pytest.approx(agreement["untuned"]["16"]["psnr"])  # the distiller's own


def test_scales_above_1_go_through_the_chain(study_run):
    """The chained 2x point costs the 1x base plus half the steps at 2x (strength 0.5), not a full 2x pass."""
    _, rows = study_run
    at = {(r["arm"], r["step"], r["resolution"]): r for r in rows}
    small, large = at["teacher", "3", "16"], at["teacher", "3", "32"]
    steps_x_guidance = float(small["sampling_gflops"]) / float(small["forward_gflops"])
    expected = float(small["forward_gflops"]) * steps_x_guidance + float(large["forward_gflops"]) * steps_x_guidance / 2
    assert float(large["sampling_gflops"]) == pytest.approx(expected)
