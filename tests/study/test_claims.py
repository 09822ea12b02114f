"""The claims table, generated from study folders (study.json + measurements.csv) written here from
synthetic measurements: each verdict (reproduces, ties, does not, not measurable, not run yet)."""

import csv
import json

from ditkit.study.claims import Claim, claims_table, load_study, read_claim
from ditkit.study.report import COLUMNS

BUDGET = 1000.0


def row(arm, seed, gflops, fid, legibility, kind="train", resolution=32, psnr=""):
    return {"arm": arm, "label": arm, "kind": kind, "seed": seed, "fraction": gflops / BUDGET, "step": int(gflops),
            "train_gflops": gflops, "resolution": resolution, "fid": fid, "kid": 0.1, "legibility": legibility,
            "psnr": psnr, "ssim": "", "forward_gflops": 0.1, "sampling_gflops": 2.0, "step_ms": 1.0, "peak_mib": 1.0}


def curves(arm, finals, kind="train"):
    """Two seeds, FID and legibility at 500 and 1000 GFLOPs; `finals`: per seed (fid, legibility) at 1000."""
    return [r for seed, (fid, legibility) in enumerate(finals)
            for r in (row(arm, seed, 500.0, 30.0, 0.3, kind), row(arm, seed, BUDGET, fid, legibility, kind))]


def write_study(folder, arms, rows):
    folder.mkdir(parents=True)
    settings = {"title": "synthetic", **{f"arms.{name}": {"resolved": {"kind": kind, "teacher": teacher}}
                                        for name, (kind, teacher) in arms.items()}}
    (folder / "study.json").write_text(json.dumps(settings))
    with (folder / "measurements.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def backbones(tmp_path, dit_legibility=(0.9, 0.92)):
    rows = (curves("dit", [(10.0, dit_legibility[0]), (10.2, dit_legibility[1])])
            + curves("better", [(5.0, 0.99), (5.2, 0.99)])      # ahead on both, every seed
            + curves("level", [(10.1, 0.91), (10.1, 0.91)])     # within the seeds' spread
            + curves("worse", [(20.0, 0.5), (21.0, 0.5)]))
    arms = {name: ("train", None) for name in ("dit", "better", "level", "worse")}
    write_study(tmp_path / "study-backbones", arms, rows)
    return load_study(tmp_path / "study-backbones")


def claim(arm, **fields):
    return Claim("paper", "claim", fields.pop("study", "study-backbones"), arm, fields.pop("kind", "match"), **fields)


def test_match_claims_reproduce_tie_or_do_not(tmp_path):
    study = backbones(tmp_path)
    result, verdict = read_claim(claim("better"), study)
    assert verdict == "reproduces" and "better matches dit on FID at" in result
    assert read_claim(claim("level"), study)[1] == "ties"
    assert read_claim(claim("level", tie="reproduces"), study)[1] == "reproduces"  # "as good as" claims
    result, verdict = read_claim(claim("worse"), study)
    assert verdict == "does not" and "worse does not reach dit's final FID within the budget" in result


def test_a_study_whose_baseline_is_not_legible_tests_nothing(tmp_path):
    study = backbones(tmp_path, dit_legibility=(0.11, 0.12))
    result, verdict = read_claim(claim("better"), study)
    assert verdict == "not measurable" and "dit reaches only 11.5% legibility" in result


def test_a_student_is_read_against_its_teacher_at_its_scale(tmp_path):
    teacher = [row("teacher", 0, BUDGET, 2.0, 0.99, resolution=size) for size in (32, 128)]
    student = [row("student", seed, gflops, fid, legibility, "distill", size)
               for seed in (0, 1) for size in (32, 128)
               for gflops, fid, legibility in ((0.0, 9.0, 0.5), (BUDGET, 2.0 + seed * 0.1 + (size == 128) * 5, 0.99))]
    write_study(tmp_path / "study-distillation", {"teacher": ("train", None), "student": ("distill", "teacher")},
                teacher + student)
    study = load_study(tmp_path / "study-distillation")
    at_1x = claim("student", study="study-distillation", kind="student", tie="reproduces")
    result, verdict = read_claim(at_1x, study)
    assert verdict == "reproduces" and "FID at 32 px: student 2.05 vs teacher 2, untrained 9 (tie)" in result
    result, verdict = read_claim(claim("student", study="study-distillation", kind="student", scale=4), study)
    assert verdict == "does not" and "FID at 128 px: student 7.05 vs teacher 2" in result


def test_the_table_links_each_study_and_says_what_has_not_run(tmp_path):
    backbones(tmp_path)
    table = claims_table(tmp_path, (claim("better"), claim("student", study="study-distillation", kind="student")))
    assert "| paper | claim | study | miniature result | verdict |" in table
    assert "[study-backbones](study-backbones/report.md), arm `better`" in table and "**reproduces**" in table
    assert "| study-distillation, arm `student` | not run yet | **-** |" in table
