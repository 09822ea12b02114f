"""The timestep spacing: DiT's official respacing, the record field, and today's default kept bit for bit.

The official respacing is written out here from its definition (facebookresearch/DiT
diffusion/respace.py: the training steps cut into equal sections, each strided by a fractional
stride whose positions are rounded), not derived from ditkit's code."""

import pytest
import torch

from diffusers import DDIMScheduler, DDPMScheduler
from ditkit import DitkitError
from ditkit.diffusion import DDPMObjective, FlowMatchingObjective, sample
from ditkit.diffusion.pipeline import sample_inputs
from ditkit.diffusion.respacing import RespacedDDPM, space_timesteps
from ditkit.diffusion.sampling import guided_output
from ditkit.models import build_model, config_to_dict, model_config
from ditkit.record import DiffusionSettings, RunRecord, Sampling
from ditkit.train.config import config_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def respaced_by_definition(num_timesteps: int, section_counts: list[int]) -> set[int]:
    """The steps kept by the official respacing of `num_timesteps` into sections of `section_counts`."""
    sections = len(section_counts)
    kept, start = set(), 0
    for i, count in enumerate(section_counts):
        size = num_timesteps // sections + (1 if i < num_timesteps % sections else 0)
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.add(start + round(position))
            position += stride
        start += size
    return kept


@pytest.mark.parametrize("steps", [1, 2, 7, 25, 100, 250, 999, 1000])
def test_the_official_respacing_keeps_the_steps_its_definition_keeps(steps):
    ours = space_timesteps(1000, steps)
    assert ours == sorted(respaced_by_definition(1000, [steps]))
    assert len(ours) == steps and ours[0] == 0


def test_the_official_respacing_at_25_and_250_steps():
    assert space_timesteps(1000, 25)[::-1][:3] == [999, 957, 916] and space_timesteps(1000, 25)[:2] == [0, 42]
    assert space_timesteps(1000, 250)[:3] == [0, 4, 8] and space_timesteps(1000, 250)[-1] == 999


def test_the_respaced_process_has_its_own_betas_from_the_kept_alphas():
    scheduler = RespacedDDPM()
    scheduler.set_timesteps(25)
    alphas_cumprod = scheduler.train_alphas_cumprod
    kept = space_timesteps(1000, 25)
    assert scheduler.timesteps.tolist() == kept[::-1]
    assert torch.exp(scheduler._tables["max_log"][3]).item() == pytest.approx(
        1 - (alphas_cumprod[kept[3]] / alphas_cumprod[kept[2]]).item(), rel=1e-12)


@pytest.mark.parametrize("steps", [0, 1001])
def test_an_impossible_step_count_is_one_line(steps):
    with pytest.raises(DitkitError, match="official timestep spacing takes 1 to 1000 steps"):
        space_timesteps(1000, steps)


def tiny_ddpm_model(learn_sigma: bool):
    config = model_config("DiT-Nano/4", in_channels=1, vae_scale=1, depth=1, hidden_size=32, num_heads=2,
                          num_classes=10, learn_sigma=learn_sigma)
    torch.manual_seed(0)
    model = build_model(config).eval()
    for p in model.parameters():  # DiT starts as the identity map; give it something to do
        p.data.normal_(0, 0.05)
    return model, config


def diffusers_trailing_loop(model, scheduler, shape, labels, steps, seed, cfg_scale):
    """How ditkit sampled a DDPM run before the spacing was recorded: diffusers' scheduler, trailing."""
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    options = {"generator": generator} if isinstance(scheduler, DDPMScheduler) else {}
    for t in scheduler.timesteps:
        out = guided_output(model, x, t.float().expand(shape[0]), labels, cfg_scale, model.y_embedder.null_label)
        if not (isinstance(scheduler, DDPMScheduler) and scheduler.variance_type == "learned_range"):
            out = out[:, :shape[1]]
        x = scheduler.step(out, t, x, **options).prev_sample
    return x


@pytest.mark.parametrize("sampler,learn_sigma", [("ddpm", True), ("ddpm", False), ("ddim", False)])
def test_a_run_without_the_field_samples_bit_identically_to_before(sampler, learn_sigma):
    model, config = tiny_ddpm_model(learn_sigma)
    old = {"model": config_to_dict(config), "data": {"resolution": 8, "source": "digits"},
           "diffusion": {"objective": "ddpm", "learn_sigma": learn_sigma, "sampler": sampler, "sample_steps": 6,
                         "cfg_scale": 3.0}}
    record = RunRecord.from_dict(old)
    assert record.diffusion.timestep_spacing == "trailing"
    labels = torch.tensor([2, 5])
    with torch.no_grad():
        ours = sample_inputs(model, record, record.sampling(num=2, labels=labels, seed=4), progress=False)
        common = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                      clip_sample=False, timestep_spacing="trailing")
        scheduler = DDIMScheduler(**common) if sampler == "ddim" else DDPMScheduler(
            **common, variance_type="learned_range" if learn_sigma else "fixed_small")
        before = diffusers_trailing_loop(model, scheduler, (2, 1, 8, 8), labels, 6, 4, 3.0)
    assert torch.equal(ours, before)


def test_the_spacing_can_be_chosen_at_sampling_time():
    model, config = tiny_ddpm_model(True)
    record = RunRecord(model=config, diffusion=DiffusionSettings(objective="ddpm", sample_steps=5),
                       data=RunRecord.from_dict({"model": config_to_dict(config), "diffusion": {},
                                                 "data": {"resolution": 8}}).data)
    with torch.no_grad():
        trailing = sample_inputs(model, record, record.sampling(num=2, seed=1), progress=False)
        official = sample_inputs(model, record, record.sampling(num=2, seed=1, timestep_spacing="official"),
                                 progress=False)
        direct = sample(model, DDPMObjective(), (2, 1, 8, 8), labels=torch.tensor([0, 1]), steps=5, seed=1,
                        cfg_scale=1.5, timestep_spacing="official", progress=False)
    assert not torch.allclose(trailing, official, atol=1e-4)
    assert torch.equal(official, direct)


def test_a_train_config_sets_the_spacing():
    config = config_from_dict({"diffusion": {"objective": "ddpm", "timestep_spacing": "official"}})
    assert config.diffusion.timestep_spacing == "official"
    assert config_from_dict({"diffusion": {"objective": "ddpm"}}).diffusion.timestep_spacing == "trailing"


@pytest.mark.parametrize("values,message", [
    ({"objective": "ddpm", "timestep_spacing": "offical"},
     "config key diffusion.timestep_spacing must be one of official, trailing, leading, linspace, got 'offical'"),
    ({"objective": "flow", "timestep_spacing": "official"},
     "diffusion.timestep_spacing 'official' applies to the ddpm objective only"),
    ({"objective": "ddpm", "sampler": "ddim", "timestep_spacing": "official"},
     "diffusion.timestep_spacing official is DiT's DDPM sampler, not ddim: use diffusion.sampler ddpm"),
])
def test_bad_spacings_are_one_line_errors(values, message):
    for make in (lambda: DiffusionSettings(**values), lambda: config_from_dict({"diffusion": values})):
        with pytest.raises(DitkitError, match=message) as error:
            make()
        assert "\n" not in str(error.value)


def test_bad_spacings_at_sampling_time_are_one_line_errors():
    record = RunRecord.from_dict({"model": config_to_dict(tiny_ddpm_model(True)[1]), "data": {"resolution": 8},
                                  "diffusion": {"objective": "ddpm"}})
    with pytest.raises(DitkitError, match="unknown timestep spacing 'even': choose one of official"):
        Sampling(timestep_spacing="even")
    with pytest.raises(DitkitError, match="timestep spacing official is DiT's DDPM sampler, not ddim"):
        record.sampling(sampler="ddim", timestep_spacing="official")
    with pytest.raises(DitkitError, match="applies to the ddpm objective only"):
        sample(tiny_ddpm_model(False)[0], FlowMatchingObjective(), (1, 1, 4, 4), timestep_spacing="official",
               progress=False)


@pytest.mark.parametrize("spacing", ["official", "trailing"])
def test_a_record_that_claims_learned_sigma_for_a_fixed_sigma_model_is_one_line(spacing):
    model, config = tiny_ddpm_model(False)  # was: TypeError unsupported operand NoneType + int (issue 27 item 12)
    with pytest.raises(DitkitError, match="outputs 1 channels, not the 2 of a learned-sigma model: its record's "
                                          "diffusion.learn_sigma must be false"):
        sample(model, DDPMObjective(learn_sigma=True), (1, 1, 8, 8), labels=torch.tensor([1]), steps=2,
               timestep_spacing=spacing, progress=False)
