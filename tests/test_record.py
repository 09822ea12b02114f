"""The run record: typed, validated, the owner of the sampling defaults."""

import json

import pytest
import torch

from ditkit import DitkitError
from ditkit.models import config_to_dict, model_config
from ditkit.record import FORMAT, DataSettings, DiffusionSettings, RunRecord, Sampling

LEGACY = {  # what ditkit 0.1 wrote: no format key, every diffusion key present
    "model": config_to_dict(model_config("DiT-Nano/4", in_channels=1, num_classes=10, vae_scale=1)),
    "diffusion": {"objective": "flow", "learn_sigma": True, "timestep_sampling": "uniform", "sampler": None,
                  "sample_steps": 50, "cfg_scale": 1.5},
    "data": {"source": "digits", "resolution": 32, "vae": None, "class_names": [str(i) for i in range(10)]},
}


def test_round_trip_keeps_every_field_and_marks_the_format():
    record = RunRecord.from_dict(LEGACY)
    stored = record.to_dict()
    assert stored["format"] == FORMAT
    assert stored == {**LEGACY, "format": FORMAT, "data": {**LEGACY["data"], "prompt_embeds": None},
                      "diffusion": {**LEGACY["diffusion"], "guidance_channels": None, "scheduler": None,
                                    "step_like_dit_pipeline": False, "timestep_spacing": None}}
    assert RunRecord.from_json(record.to_json()).to_dict() == stored
    assert record.model == model_config("DiT-Nano/4", in_channels=1, num_classes=10, vae_scale=1)


def test_an_older_record_with_fewer_diffusion_keys_is_upgraded_with_the_defaults():
    old = {**LEGACY, "diffusion": {"objective": "ddpm", "sample_steps": 20, "cfg_scale": 4.0}}
    record = RunRecord.from_dict(old)
    assert record.diffusion == DiffusionSettings(objective="ddpm", learn_sigma=True, timestep_sampling="uniform",
                                                 sampler=None, sample_steps=20, cfg_scale=4.0, guidance_channels=None,
                                                 scheduler=None, step_like_dit_pipeline=False)
    assert record.diffusion.timestep_spacing == "trailing"  # what ditkit's DDPM runs sampled with before the key


@pytest.mark.parametrize("change,message", [
    ({"format": 99}, "format 99, this ditkit reads format 1"),
    ({"model": None}, "not a ditkit run record .no model section"),
    ({"extra": 1}, "unknown record keys extra"),
    ({"diffusion": {**LEGACY["diffusion"], "guidance_rescale": 0.7}}, "unknown diffusion keys guidance_rescale"),
    ({"data": {"source": "digits"}}, "incomplete run record"),
    ({"data": {**LEGACY["data"], "resolution": 0}}, "data.resolution must be a positive"),
    ({"diffusion": {**LEGACY["diffusion"], "objective": "edm"}}, "unknown objective 'edm'"),
    ({"diffusion": {**LEGACY["diffusion"], "sample_steps": 0}}, "diffusion.sample_steps must be"),
])
def test_a_foreign_or_broken_record_is_refused_in_one_line(change, message):
    with pytest.raises(DitkitError, match=message) as error:
        RunRecord.from_dict({**LEGACY, **change}, source="x.safetensors")
    assert "\n" not in str(error.value)


def test_bad_json_is_one_line():
    with pytest.raises(DitkitError, match="not valid JSON"):
        RunRecord.from_json("{not json", source="x.safetensors")
    with pytest.raises(DitkitError, match="a JSON object is expected"):
        RunRecord.from_json(json.dumps([1, 2]))


def test_sampling_takes_what_the_caller_leaves_unset_from_the_run():
    record = RunRecord.from_dict({**LEGACY, "diffusion": {**LEGACY["diffusion"], "sampler": "euler"}})
    filled = record.sampling(Sampling(num=3, height=64, steps=7))
    assert (filled.num, filled.height, filled.width, filled.steps) == (3, 64, 32, 7)
    assert (filled.cfg_scale, filled.sampler) == (1.5, "euler")
    assert record.sampling(cfg_scale=0.0).cfg_scale == 0.0  # an explicit zero is kept, not replaced


@pytest.mark.parametrize("fields,message", [
    ({"num": 0}, "number of images must be at least 1"), ({"num": -2}, "at least 1"),
    ({"steps": 0}, "steps must be a whole number of at least 1"), ({"cfg_scale": float("nan")}, "finite"),
    ({"height": -8}, "image size must be positive"), ({"positions": "yarn"}, "unknown position scaling"),
])
def test_impossible_sampling_settings_are_refused(fields, message):
    with pytest.raises(DitkitError, match=message):
        Sampling(**fields)


def test_class_labels_by_index_or_name_cycle_over_the_images():
    record = RunRecord(model=None, diffusion=DiffusionSettings(), data=DataSettings(16, class_names=["cat", "dog"]))
    assert record.class_labels("dog,0", 5).tolist() == [1, 0, 1, 0, 1]
    assert record.class_labels(None, 5) is None
    with pytest.raises(DitkitError, match="neither an index nor a class name .cat, dog"):
        record.class_labels("cow", 2)


def test_a_diffusers_student_record_round_trips_and_is_not_loaded_as_a_ditkit_model(tmp_path):
    from safetensors.torch import save_file

    from ditkit.checkpoint import load_checkpoint

    values = {"model": {"diffusers": "FluxTransformer2DModel", "path": "/models/flux/transformer"},
              "diffusion": {"objective": "flow", "sampler": "euler", "sample_steps": 28, "cfg_scale": 1.0},
              "data": {"resolution": 512, "prompt_embeds": None}, "distill": {"radius": 8}}
    record = RunRecord.from_dict(values)
    assert record.model.diffusers == "FluxTransformer2DModel" and record.num_classes == 0
    file = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, file, metadata={"ditkit": record.to_json()})
    with pytest.raises(DitkitError, match="diffusers student .FluxTransformer2DModel"):
        load_checkpoint(file)
