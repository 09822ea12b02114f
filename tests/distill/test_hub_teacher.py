"""`ditkit distill --teacher ORG/NAME [--revision R]`: the teacher's transformer from the local Hugging
Face cache, resolved as `ditkit generate --pipeline` resolves one (a fake cache in a temporary HF_HOME,
laid out as huggingface_hub lays it out; nothing is ever fetched)."""

import json

import pytest
import torch

from ditkit.checkpoint import META_KEY, read_header
from ditkit.distill.load import teacher_folder
from ditkit.errors import DitkitError
from ditkit.record import RunRecord
from helpers import run_cli
from tiny_diffusers import HUB_COMMIT, fake_hub_cache, flux_pipeline

COMMIT = HUB_COMMIT


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """HF_HOME holding a tiny FLUX pipeline as org/tiny-flux (main = COMMIT), offline."""
    torch.manual_seed(0)
    fake_hub_cache(tmp_path, monkeypatch, "org/tiny-flux", flux_pipeline(False).save_pretrained)
    return tmp_path


def test_teacher_resolves_to_the_cached_pipelines_transformer(cache):
    snapshot = cache / "hf" / "hub" / "models--org--tiny-flux" / "snapshots" / COMMIT
    assert teacher_folder("org/tiny-flux") == snapshot / "transformer"
    assert teacher_folder("org/tiny-flux", COMMIT) == snapshot / "transformer"
    assert teacher_folder(str(snapshot)) == snapshot / "transformer"  # a pipeline folder: its transformer
    assert teacher_folder(str(snapshot / "transformer")) == snapshot / "transformer"
    assert teacher_folder(str(cache / "not-a-model")) is None  # left to the ditkit-checkpoint loader


def test_distill_from_the_cache(cache, capsys):
    out = cache / "student"
    code, stdout, err = run_cli(capsys, "distill", "--teacher", "org/tiny-flux", "--revision", COMMIT, "--radius",
                                "1", "--resolution", "32", "--teacher-steps", "1", "--num-samples", "2", "--steps",
                                "1", "--batch-size", "2", "--eval-num", "1", "--out", str(out), "--no-progress")
    assert code == 0, err
    written = json.loads((out / "distill.json").read_text())
    assert written["teacher"] == "org/tiny-flux" and written["teacher_revision"] == COMMIT
    _, metadata, _ = read_header(out)  # the student names the exact snapshot its teacher came from
    record = RunRecord.from_json(metadata[META_KEY])
    assert record.model.path.endswith(f"snapshots/{COMMIT}/transformer")


@pytest.mark.parametrize("options, expected", [
    (("--teacher", "org/absent"), "`hf download org/absent`"),
    (("--teacher", "org/tiny-flux", "--revision", "v2"), "`hf download org/tiny-flux --revision v2`"),
])
def test_a_teacher_missing_from_the_cache_is_one_line(cache, capsys, options, expected):
    code, _, err = run_cli(capsys, "distill", *options, "--out", str(cache / "student"), "--no-progress")
    assert code == 2 and expected in err and str(cache / "hf" / "hub") in err and err.count("\n") == 1


def test_revision_with_a_local_folder_is_refused(cache):
    with pytest.raises(DitkitError, match="drop --revision"):
        teacher_folder(str(cache / "hf"), "main")
