import contextlib
import csv
import io
import re

import pytest
import torch
import yaml

from ditkit.cli.main import main
from ditkit.study import Study

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_DIT = ["model.args.depth=1", "model.args.hidden_size=32", "model.args.num_heads=2"]
TINY_SSM = ["model.name=DiffuSSM-Nano", "model.args.depth=1", "model.args.hidden_size=16", "model.args.state_size=8"]
# Two arms of different cost per step (about 4x) on the same compute: 0.5 GFLOPs buys ~20 and ~80 steps.
TINY_STUDY = {
    "title": "tiny", "seeds": [0], "budget": {"gflops": 0.5},
    "train_overrides": ["data.resolution=16", "train.batch_size=4", "train.log_every=5", "train.num_samples=2",
                        "diffusion.sample_steps=2", "train.lr=1e-3"],
    "eval": {"at": [0.5, 1.0], "num": 8, "num_reference": 16, "bench_repeats": 1},
    "arms": {"dit": {"train": "digits", "overrides": TINY_DIT}, "ssm": {"train": "digits", "overrides": TINY_SSM}},
}


def study_args(config, out, features, *extra) -> list[str]:
    return ["study", str(config), "--out", str(out), "--features-path", str(features), "--no-progress", *extra]


def file_times(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny-study.yaml"
    path.write_text(yaml.safe_dump(TINY_STUDY))
    return path


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, config_file, digits_features_path):
    """A tiny study whose second arm crashed, then resumed to the end: (out folder, the first arm's files
    after the crash, what the resumed run printed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture, which a module-scoped fixture cannot use
    out = tmp_path_factory.mktemp("study") / "run"
    train_to = Study.train_to

    def crash_in_ssm(self, plan, seed, step):
        if plan.name == "ssm":
            raise RuntimeError("simulated crash")
        return train_to(self, plan, seed, step)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Study, "train_to", crash_in_ssm)
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(study_args(config_file, out, digits_features_path))
    first_arm = file_times(out / "arms" / "dit")
    logged = io.StringIO()
    with contextlib.redirect_stdout(logged):
        code = main(study_args(config_file, out, digits_features_path, "--resume"))
    torch.set_num_threads(threads)
    assert code == 0, logged.getvalue()
    return out, first_arm, logged.getvalue()


def measurements(out) -> list[dict]:
    with (out / "report" / "measurements.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_tiny_study_runs_to_its_report(resumed):
    out, _, _ = resumed
    for name in ("report.md", "measurements.csv", "quality-vs-train-compute.png", "quality-vs-sampling-cost.png"):
        assert (out / "report" / name).is_file(), name
    rows = measurements(out)
    assert {(r["arm"], r["fraction"]) for r in rows} == {(a, f) for a in ("dit", "ssm") for f in ("0.5", "1.0")}
    assert all(float(r["fid"]) >= 0 and 0 <= float(r["legibility"]) <= 1 and float(r["step_ms"]) > 0 for r in rows)
    report = (out / "report" / "report.md").read_text()
    for heading in ("## Compute", "### 50% of the budget", "### 100% of the budget", "## Reading"):
        assert heading in report
    assert re.search(r"100% of the budget, 16 px, FID: .*(leads|tie)", report)


def test_arms_train_on_the_same_counted_compute(resumed):
    out, _, _ = resumed
    final = {r["arm"]: r for r in measurements(out) if r["fraction"] == "1.0"}
    steps = {arm: int(r["step"]) for arm, r in final.items()}
    assert steps["dit"] > 2 * steps["ssm"]  # the cheaper arm gets more steps ...
    spent = [float(r["train_gflops"]) for r in final.values()]
    assert max(spent) / min(spent) < 1.05  # ... for the same training GFLOPs
    assert all(abs(g / TINY_STUDY["budget"]["gflops"] - 1) < 0.05 for g in spent)


def test_an_interrupted_study_resumes_without_retraining_the_first_arm(resumed):
    out, first_arm, logged = resumed
    assert re.search(r"train dit, seed 0.*done earlier.*skipped", logged)
    assert re.search(r"train ssm, seed 0.*\.\.\.", logged)
    after = file_times(out / "arms" / "dit")
    assert after == first_arm  # not a file of the first arm was rewritten
    assert (out / "arms" / "ssm" / "seed-0" / "eval" / "step_0000020.json").is_file()


def test_a_changed_config_in_the_same_folder_is_refused(resumed, config_file, digits_features_path, capsys):
    out, _, _ = resumed
    before = file_times(out)
    code = main(study_args(config_file, out, digits_features_path, "--resume", "budget.gflops=0.6"))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "other settings" in err and "budget" in err
    code = main(study_args(config_file, out, digits_features_path))  # no --resume: a previous run
    err = capsys.readouterr().err
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1
    assert file_times(out) == before


@pytest.mark.parametrize("override, message", [
    ("arms.dit.overrides=[model.name=DiT-Huge/9]", "arm dit: unknown model 'DiT-Huge/9'"),
    ("arms.dit.overrides=[model.mixer=nope]", "arm dit: .*nope"),
    ("budget.gflops=0.01", "arm ssm: budget.gflops=0.01 buys no training step"),
    ("arms.dit.colour=red", "config has no key arms.dit.colour"),
    ("eval.at=[0.5,2]", "eval.at must list fractions"),
    ("arms.dit.teacher=ssm", "arm dit must set one of train"),
    ("eval.at=[0]", "arm dit trains from scratch: eval.at must list a fraction above 0"),
    ("eval.chain_strength=1.5", r"eval.chain_strength must be a noise level in \(0, 1\], got 1.5"),
    ("eval.positions=warp", "eval.positions must be one of none, ntk, interpolate"),
    (f"seeds=[{2**64}]", rf"seeds must list seeds \(whole numbers in \[0, {2**64}\)\), got {2**64}"),
    ("eval.seed=-1", r"eval.seed must be in \[0, "),
])
def test_a_bad_config_fails_in_one_line_before_any_work(config_file, tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert main(["study", str(config_file), "--out", str(out), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()
