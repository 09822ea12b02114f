"""Atomic writes and JSON-lines reading (ditkit.files)."""

import errno
import json

import pytest
import torch

from ditkit.errors import DitkitError
from ditkit.files import atomic_path, atomic_write_text, read_jsonl


def test_an_atomic_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_path_serves_writers_that_take_a_path(tmp_path):
    path = tmp_path / "weights.pt"
    with atomic_path(path) as tmp:
        torch.save({"w": torch.ones(2)}, tmp)
    assert torch.equal(torch.load(path)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["weights.pt"]


def test_a_failed_write_keeps_the_old_content_and_removes_the_temporary_file(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(path) as tmp:
        tmp.write_text("half of the ne")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def write_lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_read_jsonl_reads_records_and_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", json.dumps({"step": 1}), "", json.dumps({"step": 2}))
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", json.dumps({"step": 1}), '{"step": 2, "lo')
    with pytest.warns(UserWarning, match="torn last line 2"):
        assert read_jsonl(path) == [{"step": 1}]


def test_a_bad_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", json.dumps({"step": 1}), "{oops", json.dumps({"step": 3}))
    with pytest.raises(DitkitError, match=r"m\.jsonl line 2 is not JSON"):
        read_jsonl(path)


def test_resuming_a_metrics_log_drops_later_records_and_a_torn_line(tmp_path):
    from ditkit.train.loop import MetricsLog

    write_lines(tmp_path / "metrics.jsonl", *(json.dumps({"step": s, "loss": 0.5}) for s in (1, 2, 3)), '{"st')
    log = MetricsLog(tmp_path, enabled=True)
    with pytest.warns(UserWarning, match="torn"):
        log.drop_after(2)
    log.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.5}]


@pytest.mark.parametrize("output,role_path,relation", [
    ("run", "run", "is"),
    ("run", "run/checkpoints/step_1", "contains"),
    ("run/student", "run", "lies inside"),
])
def test_an_output_over_an_input_is_refused_naming_both(tmp_path, output, role_path, relation):
    from ditkit.files import refuse_output_over_inputs

    (tmp_path / "run" / "checkpoints" / "step_1").mkdir(parents=True)
    with pytest.raises(DitkitError, match=f"output folder .*{output} {relation} the teacher .*{role_path}: give "
                                          "an output folder outside the teacher"):
        refuse_output_over_inputs(tmp_path / output, {"teacher": tmp_path / role_path})


def test_outputs_beside_their_inputs_and_inputs_that_are_no_paths_pass(tmp_path):
    from ditkit.files import refuse_output_over_inputs

    (tmp_path / "teacher").mkdir()
    refuse_output_over_inputs(tmp_path / "teacher-student", {"teacher": tmp_path / "teacher", "embeds": None,
                                                             "hub model": "org/model"})


@pytest.mark.parametrize("fault,why", [
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
    (OSError(errno.EROFS, "Read-only file system"), "the location is read-only"),
    (OSError(errno.EFBIG, "File too large"), r"the file is larger than the file system \(or a size limit\) allows"),
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), "the disk is full"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file: "
                  "Read-only file system"), "the location is read-only"),
])
def test_every_writer_s_storage_fault_becomes_one_line_naming_the_file(tmp_path, fault, why):
    from ditkit.files import writing

    with pytest.raises(DitkitError, match=f"could not write {tmp_path / 'out.bin'}: {why}; ") as raised:
        with writing(tmp_path / "out.bin"):
            raise fault
    assert "\n" not in str(raised.value)


def test_other_errors_pass_through_and_a_temporary_name_is_never_shown(tmp_path):
    from ditkit.files import atomic_path, writing

    with pytest.raises(KeyError), writing(tmp_path / "out.bin"):
        raise KeyError("not a storage fault")
    with pytest.raises(DitkitError, match=f"could not write {tmp_path / 'grid.png'}: the disk is full") as raised:
        with atomic_path(tmp_path / "grid.png") as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert ".tmp" not in str(raised.value)


def test_a_lock_path_that_is_a_folder_is_one_line(tmp_path):
    from ditkit.files import LOCK_NAME, FolderLock

    (tmp_path / LOCK_NAME / "inside").mkdir(parents=True)
    with pytest.raises(DitkitError, match=f"{LOCK_NAME} is a folder, where ditkit keeps its lock file: remove it"):
        FolderLock(tmp_path, "ditkit train").__enter__()
    assert (tmp_path / LOCK_NAME / "inside").is_dir()
