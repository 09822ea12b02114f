import json
import re
import shutil

import pytest
import torch

from ditkit import DitkitError
from ditkit.cli.main import main
from ditkit.study.quickstart import STAGES, quickstart_settings

pytestmark = pytest.mark.usefixtures("one_thread")

REPORT_FILES = ["report.md", "quickstart.json", "quality.json", "samples-16.png", "samples-64.png", "bench.png",
                "teacher-loss.png", "distill-loss.png", "distill-compare.png", "bench/bench.md", "bench/bench.csv",
                "samples/teacher-1x.safetensors", "samples/student-4x.safetensors", "student/agreement.json"]


def quickstart(out, features, *extra) -> list[str]:
    return ["quickstart", "--scale", "tiny", "--out", str(out), "--features-path", str(features), "--no-progress",
            *extra]


def stage_lines(out: str) -> dict[str, str]:
    """Stage name -> "ran" or "skipped", read from the stage headers a run printed."""
    titles = {stage.title: stage.name for stage in STAGES}
    found = {}
    for line in out.splitlines():
        match = re.match(r"\[\d/\d\] (.+?) \(at [^)]*\)(.*)", line)
        if match:
            found[titles[match.group(1)]] = "skipped" if "skipped" in match.group(2) else "ran"
    return found


def file_times(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, digits_features_path):
    """One tiny quickstart, run to the end (module-wide: each test copies it before changing it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture, which a module-scoped fixture cannot use
    out = tmp_path_factory.mktemp("quickstart") / "run"
    assert main(quickstart(out, digits_features_path)) == 0
    torch.set_num_threads(threads)
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def test_the_report_and_every_file_it_links_exist(finished):
    for name in REPORT_FILES:
        assert (finished / name).is_file(), name
    report = (finished / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert {"samples-16.png", "samples-64.png", "bench.png", "teacher-loss.png", "bench/bench.md"} <= set(links)
    assert all((finished / link).is_file() for link in links), links
    assert all(not link.startswith("/") for link in links)  # relative: the folder can be moved
    for heading in ("## Reading", "## Settings", "## Time per stage", "| 16 px | 8 |", "| 64 px | 4 |"):
        assert heading in report
    assert all((finished / ".stages" / f"{stage.name}.json").is_file() for stage in STAGES)


def test_legibility_is_measured_for_every_grid_row_and_the_fid_samples(finished):
    from ditkit.study.quickstart import SAMPLE_SETS

    legibility = json.loads((finished / "quality.json").read_text())["legibility"]
    assert {s.name for s in SAMPLE_SETS} | {"teacher-fid", "student-fid"} <= set(legibility)
    for name, row in legibility.items():
        assert 0 <= row["accuracy"] <= 1, name
    assert legibility["student-4x-upscaled"]["size"] == 64 and legibility["teacher-fid"]["num"] == 8
    report = (finished / "report.md").read_text()
    assert "Legibility" in report and "| student, upscaled from the teacher's 1x" in report


def test_a_second_run_skips_every_stage_and_rewrites_nothing(run_copy, digits_features_path, capsys):
    before = file_times(run_copy)
    assert main(quickstart(run_copy, digits_features_path)) == 0
    assert stage_lines(capsys.readouterr().out) == {stage.name: "skipped" for stage in STAGES}
    assert file_times(run_copy) == before


def test_a_removed_stage_reruns_alone_with_the_stages_that_read_it(run_copy, digits_features_path, capsys):
    (run_copy / ".stages" / "bench.json").unlink()
    shutil.rmtree(run_copy / "bench")
    before = file_times(run_copy)
    assert main(quickstart(run_copy, digits_features_path)) == 0
    ran = stage_lines(capsys.readouterr().out)
    assert ran == {"teacher": "skipped", "student": "skipped", "samples": "skipped", "quality": "skipped",
                   "bench": "ran", "report": "ran"}
    after = file_times(run_copy)
    assert (run_copy / "bench" / "bench.csv").is_file()
    assert all(after[name] == before[name] for name in before if name.startswith(("teacher/", "student/", "samples")))


def test_an_interrupted_sample_stage_makes_only_the_missing_samples(run_copy, digits_features_path, capsys):
    (run_copy / ".stages" / "samples.json").unlink()
    (run_copy / "samples" / "student-4x.safetensors").unlink()
    before = file_times(run_copy)
    assert main(quickstart(run_copy, digits_features_path)) == 0
    ran = stage_lines(capsys.readouterr().out)
    assert [name for name, how in ran.items() if how == "ran"] == ["samples", "quality", "report"]
    after = file_times(run_copy)
    assert after["samples/teacher-1x.safetensors"] == before["samples/teacher-1x.safetensors"]
    assert "samples/student-4x.safetensors" in after


def test_a_remade_stage_remakes_what_reads_it_afresh(run_copy, digits_features_path, capsys):
    (run_copy / ".stages" / "student.json").unlink()
    before = file_times(run_copy)
    assert main(quickstart(run_copy, digits_features_path)) == 0
    ran = stage_lines(capsys.readouterr().out)
    assert [name for name, how in ran.items() if how == "ran"] == ["student", "samples", "quality", "report"]
    after = file_times(run_copy)
    assert after["samples/teacher-1x.safetensors"] != before["samples/teacher-1x.safetensors"]  # not reused
    assert after["bench/bench.csv"] == before["bench/bench.csv"]  # the bench reads the teacher only


def test_other_settings_in_the_same_folder_are_refused(run_copy, digits_features_path, capsys):
    assert main(quickstart(run_copy, digits_features_path, "--teacher-steps", "6")) == 2
    err = capsys.readouterr().err
    assert "other settings (teacher_steps)" in err and err.count("\n") == 1


@pytest.mark.parametrize("extra,message", [
    (["--teacher-steps", "0"], "--teacher-steps must be at least 1, got 0"),
    (["--distill-steps", "-3"], "--distill-steps must be at least 1"),
])
def test_bad_step_counts_are_one_line_errors(tmp_path, digits_features_path, capsys, extra, message):
    assert main(quickstart(tmp_path / "run", digits_features_path, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_an_out_path_that_is_a_file_is_refused(tmp_path, digits_features_path, capsys):
    (tmp_path / "taken").write_text("")
    assert main(quickstart(tmp_path / "taken", digits_features_path)) == 2
    assert "is a file" in capsys.readouterr().err


def test_settings_of_a_scale_take_overrides():
    assert quickstart_settings("tiny", teacher_steps=9, distill_steps=None).teacher_steps == 9
    assert quickstart_settings().teacher_steps == 1500
    with pytest.raises(DitkitError, match="unknown scale"):
        quickstart_settings("huge")
