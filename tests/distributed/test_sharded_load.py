"""Loading a teacher onto the meta device for sharded distillation (distributed/sharded_load.py): what it
refuses, in one process and without a process group (the 2-process loads are in test_sharding.py)."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from diffusers import FluxTransformer2DModel
from ditkit import DitkitError
from ditkit.diffusers.folders import diffusers_weight_files
from ditkit.distill import DistillConfig, Distiller, DitkitTeacher
from ditkit.distill.diffusers_teacher import DiffusersTeacher
from ditkit.distributed.sharded_load import check_weights, read_rows, single_weight_file
from ditkit.mixers.clear import initial_added_parameters

FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])


@pytest.fixture(scope="module")
def split_flux(tmp_path_factory):
    """A tiny FLUX folder whose weights save_pretrained split in two files with an index."""
    folder = tmp_path_factory.mktemp("flux") / "transformer"
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FLUX)
    model.save_pretrained(folder, max_shard_size=sum(p.nbytes for p in model.parameters()) * 3 // 5)
    assert len(list(folder.glob("*.safetensors"))) == 2
    return folder


def copy_with_config(folder, tmp_path, **changes):
    copy = tmp_path / "transformer"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return copy


def test_an_empty_teacher_reads_rows_of_the_split_files(split_flux):
    teacher = DiffusersTeacher(split_flux, empty=True)
    assert all(p.is_meta for p in teacher.model.parameters())
    files = teacher.pending_weights
    plain = FluxTransformer2DModel.from_pretrained(split_flux).state_dict()
    assert files.tensors.keys() == plain.keys() and len({s.file for s in files.tensors.values()}) == 2
    for file in {s.file for s in files.tensors.values()}:
        with safe_open(file, framework="pt") as opened:
            for name, stored in files.tensors.items():
                if stored.file == file:
                    assert torch.equal(read_rows(stored, None, opened), plain[name])
                    rows = (1, min(3, stored.shape[0]))
                    assert torch.equal(read_rows(stored, rows, opened), plain[name][rows[0]:rows[1]])


def test_a_missing_weight_file_is_one_line(split_flux, tmp_path):
    folder = copy_with_config(split_flux, tmp_path)
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(DitkitError, match="index.json names diffusion_pytorch_model-00002-of-00002.safetensors, "
                                          "which is missing from .*: download that file again"):
        DiffusersTeacher(folder, empty=True)
    (folder / "diffusion_pytorch_model.safetensors.index.json").unlink()
    with pytest.raises(DitkitError, match="has no diffusion_pytorch_model.safetensors"):
        diffusers_weight_files(folder)


def test_a_truncated_weight_file_is_one_line(split_flux, tmp_path):
    folder = copy_with_config(split_flux, tmp_path)
    files = diffusers_weight_files(folder)
    last = max(files.tensors.values(), key=lambda stored: stored.file.stat().st_size).file
    with open(last, "r+b") as f:
        f.truncate(last.stat().st_size - 2)
    with pytest.raises(DitkitError, match="is damaged .*: download or copy it again"):
        diffusers_weight_files(folder)
    (folder / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(DitkitError, match="is damaged .*: download or copy it again"):
        diffusers_weight_files(folder)


@pytest.mark.parametrize("changes, message", [
    ({"num_layers": 2}, "lacks the weight transformer_blocks.1.norm1.linear.weight: the config does not match"),
    ({"num_single_layers": 0}, "holds single_transformer_blocks.0..*, which the model built from its config lacks"),
    ({"joint_attention_dim": 48}, r"context_embedder.weight in .* has shape \[32, 32\], the model built from its "
                                  r"config wants \[32, 48\]"),
])
def test_a_config_that_does_not_fit_the_weights_is_one_line(split_flux, tmp_path, changes, message):
    teacher = DiffusersTeacher(copy_with_config(split_flux, tmp_path, **changes), empty=True)
    with pytest.raises(DitkitError, match=message):
        check_weights(teacher.model, teacher.pending_weights, {})


def test_the_student_takes_clears_pooling_weights_and_nothing_else_missing(split_flux):
    teacher = DiffusersTeacher(split_flux, empty=True)
    student = teacher.make_student(radius=2, down_factor=2, backend="auto")
    added = initial_added_parameters(student)
    assert len(added) == 2 and all(torch.equal(v, torch.full((4,), 0.25)) for v in added.values())
    with pytest.raises(DitkitError, match=r"lacks the weight .*processor\.pool_weight"):
        check_weights(student, teacher.pending_weights, {})
    check_weights(student, teacher.pending_weights, added)


def test_a_ditkit_teacher_builds_empty_from_its_checkpoint(tmp_path):
    from ditkit.checkpoint import save_checkpoint
    from ditkit.record import DataSettings, DiffusionSettings, RunRecord
    from helpers import tiny_backbone

    model = tiny_backbone("dit", randomize=0.1)
    record = RunRecord(model=model.config, diffusion=DiffusionSettings(), data=DataSettings(resolution=8))
    path = save_checkpoint(tmp_path / "ckpt", 1, model=model, ema=model, optimizer=None, record=record,
                           train_state={"ema": True})
    teacher = DitkitTeacher(path, empty=True)
    assert all(p.is_meta for p in teacher.model.parameters())
    assert teacher.pending_weights.source == str(path / "ema.safetensors")
    check_weights(teacher.model, teacher.pending_weights, {})
    deeper = tiny_backbone("dit", depth=3).config  # a record that does not describe the weights
    mismatched = save_checkpoint(tmp_path / "bad", 1, model=model, ema=None, optimizer=None,
                                 record=RunRecord(model=deeper, diffusion=DiffusionSettings(),
                                                  data=DataSettings(resolution=8)), train_state={})
    empty = DitkitTeacher(mismatched, empty=True)
    with pytest.raises(DitkitError, match="model.safetensors lacks the weight blocks.2.* use another checkpoint"):
        check_weights(empty.model, empty.pending_weights, {})
    with pytest.raises(DitkitError, match="lacks the weight x_embedder.weight"):
        check_weights(teacher.model, single_weight_file(path / "model.safetensors", prefix="inner."), {})
    with pytest.raises(DitkitError, match="built without its weights .*: load it with load_teacher of a config "
                                          "with sharding=none, or distil with sharding=fsdp"):
        Distiller(teacher, DistillConfig(radius=2))
