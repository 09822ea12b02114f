import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import ditkit.checkpoint as checkpoint_module
from ditkit import DitkitError
from ditkit.checkpoint import load_checkpoint
from ditkit.diffusion.pipeline import generate
from ditkit.train import load_config, train
from ditkit.train.loop import StepBatchSampler
from ditkit.train.trainer import Trainer, lr_at, parameter_groups
from helpers import tiny_run


def weights(run, step, name):
    return load_file(run / "checkpoints" / f"step_{step:07d}" / f"{name}.safetensors")


SSM_MODEL = ["model.name=DiffuSSM-Nano", "model.args.depth=1", "model.args.hidden_size=16",
             "model.args.state_size=4"]


@pytest.mark.parametrize("model", [[], SSM_MODEL], ids=["dit", "diffussm-two-param-groups"])
def test_resume_continues_exactly(tmp_path, model):
    extra = ["diffusion.objective=ddpm", "train.grad_accum=2", "data.hflip=true", "train.warmup_steps=3", *model]
    train(load_config(None, tiny_run(tmp_path / "straight", *extra)), progress=False)
    train(load_config(None, tiny_run(tmp_path / "halves", *extra, "train.steps=2")), progress=False)
    train(load_config(None, tiny_run(tmp_path / "halves", *extra)), resume=True, progress=False)
    for name in ("model", "ema"):
        a, b = weights(tmp_path / "straight", 4, name), weights(tmp_path / "halves", 4, name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # and training did change the weights
    assert not torch.equal(weights(tmp_path / "straight", 2, "model")["final_layer.linear.weight"],
                           weights(tmp_path / "straight", 4, "model")["final_layer.linear.weight"])


def test_run_writes_metrics_samples_and_self_describing_checkpoints(tmp_path):
    run = tmp_path / "run"
    final = train(load_config(None, tiny_run(run, "train.sample_every=2", "train.keep_checkpoints=1")), progress=False)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in lines)
    assert {"lr", "steps_per_sec", "samples_per_sec"} <= lines[0].keys()
    assert Image.open(run / "loss.png").size == (600, 350)
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    assert Image.open(run / "samples" / "step_0000004.png").size == (2 + 2 * 18, 2 + 2 * 18)
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step")] == ["step_0000004"]
    model, record = load_checkpoint(final / "ema.safetensors")  # the file alone rebuilds the model
    assert model.config.hidden_size == 32 and model.config.num_classes == 10 and model.config.in_channels == 1
    assert record.data.class_names[3] == "3" and record.diffusion.objective == "flow"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(load_config(None, tiny_run(run)), progress=False)
    real_loss, calls = trainer.objective.loss, []

    def loss(*args):
        calls.append(1)
        value = real_loss(*args)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(trainer.objective, "loss", loss)
    with pytest.raises(DitkitError, match="loss became nan at step 3.*last good checkpoint is .*step_0000002"):
        trainer.train()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    load_checkpoint(run)  # intact


def test_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(load_config(None, tiny_run(run, "train.steps=2")), progress=False)
    before = weights(run, 2, "model")

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(load_config(None, tiny_run(run)), resume=True, progress=False)
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert names == ["latest", "step_0000002"]
    after = weights(run, 2, "model")
    assert all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.undo()
    train(load_config(None, tiny_run(run)), resume=True, progress=False)  # redo steps 3-4: logged once
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_truncated_checkpoint_and_wrong_config_are_clear_errors(tmp_path):
    run = tmp_path / "run"
    final = train(load_config(None, tiny_run(run, "train.steps=2")), progress=False)
    with pytest.raises(DitkitError, match="trained with another model config \\(differs in depth\\)"):
        train(load_config(None, tiny_run(run, "model.args.depth=2")), resume=True, progress=False)
    data = (final / "ema.safetensors").read_bytes()
    (final / "ema.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DitkitError, match="damaged or truncated"):
        load_checkpoint(final)


def test_bad_resolution_fails_before_training(tmp_path):
    with pytest.raises(DitkitError, match="resolution 18x18 does not fit this model.*multiples of 4"):
        Trainer(load_config(None, tiny_run(tmp_path, "data.resolution=18")), progress=False)


def test_step_sampler_is_a_shuffled_stream_split_across_processes():
    one = StepBatchSampler(10, 5, seed=0, start=0, stop=2)
    assert sorted(sum(list(one), [])) == list(range(10))  # one epoch = every index once
    ranks = [StepBatchSampler(10, 2, seed=0, start=0, stop=5, rank=r, world=2) for r in (0, 1)]
    assert sorted(sum((sum(list(s), []) for s in ranks), [])) == sorted(list(range(10)) * 2)
    assert list(StepBatchSampler(10, 5, seed=0, start=1, stop=2)) == [one.indices(1)]
    assert list(one) != list(StepBatchSampler(10, 5, seed=1, start=0, stop=2))


def test_latent_space_training_and_decoding(tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1)
    vae.save_pretrained(tmp_path / "vae")
    cfg = load_config(None, tiny_run(tmp_path / "run", "data.source=photos", "data.photos_length=8",
                                     f"data.vae={tmp_path / 'vae'}", f"data.cache_dir={tmp_path / 'cache'}",
                                     "model.name=DiT-Nano/2", "train.steps=2"))
    final = train(cfg, progress=False)
    model, record = load_checkpoint(final)
    assert (model.config.in_channels, model.config.vae_scale, model.config.num_classes) == (4, 2, 0)
    images = generate(model, record, num=2, height=16, width=24, steps=2, cfg_scale=1.0, seed=0, progress=False)
    assert images.shape == (2, 3, 16, 24)


def test_two_process_ddp_with_torchrun_matches_one_process(tmp_path):
    """2 processes x batch 2 see the same data as 1 process x batch 4 (train.batch_size is per process);
    each process draws its own noise and timesteps, so the loss curves agree in level, not bitwise."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ditkit.cli.main", "train", "digits", *tiny_run(run, "train.num_samples=0", "train.batch_size=2",
                                                                    "train.steps=6", "train.ckpt_every=6"),
               "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("done: checkpoint") == 1  # printed by the main process only
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step")] == ["step_0000006"]
    state = json.loads((run / "checkpoints" / "step_0000006" / "training_state.json").read_text())
    assert state["num_processes"] == 2
    train(load_config(None, tiny_run(tmp_path / "one", "train.num_samples=0", "train.steps=6")), progress=False)
    two, one = ([json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
                for folder in (run, tmp_path / "one"))
    assert len(two) == len(one) == 6 and all(0 < x < 10 for x in two)
    assert abs(sum(two) / sum(one) - 1) < 0.15 and all(abs(a / b - 1) < 0.3 for a, b in zip(two, one, strict=True))


def test_accelerate_fsdp_plugin_is_refused_with_the_fix(tmp_path, monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    with pytest.raises(DitkitError, match="does not use Accelerate's FSDP plugin.*set train.sharding=fsdp and "
                                          "start with torchrun"):
        Trainer(load_config(None, tiny_run(tmp_path / "run")), progress=False)


def test_bf16_mixed_precision_on_cpu(tmp_path):
    final = train(load_config(None, tiny_run(tmp_path / "run", "train.mixed_precision=bf16", "train.steps=2")),
                  progress=False)
    assert load_file(final / "model.safetensors")["final_layer.linear.weight"].dtype == torch.float32


def test_checkpoint_loads_with_a_swapped_mixer(tmp_path, scratch_mixers):
    final = train(load_config(None, tiny_run(tmp_path / "run", "train.steps=2")), progress=False)
    original, _ = load_checkpoint(final)
    swapped, record = load_checkpoint(final, mixer="test-scaled")
    assert swapped.config.mixer == record.model.mixer == "test-scaled"
    assert type(swapped.blocks[0].mixer).__name__ == "ScaledAttention"
    torch.testing.assert_close(swapped.blocks[0].mixer.qkv.weight, original.blocks[0].mixer.qkv.weight)


def test_weights_that_do_not_fit_the_config_are_a_clear_error(tmp_path):
    from ditkit.checkpoint import load_state
    from ditkit.models import build_model, model_config

    small = build_model(model_config("DiT-Nano/4", depth=1, hidden_size=32, num_heads=2))
    wide = build_model(model_config("DiT-Nano/4", depth=1, hidden_size=64, num_heads=2))
    with pytest.raises(DitkitError, match="does not fit this model config.*size mismatch"):
        load_state(wide, small.state_dict(), tmp_path / "x.safetensors")


def test_ssm_dynamics_get_their_own_lr_and_no_weight_decay():
    cfg = load_config(None, ["model.name=DiffuSSM-Nano", "train.lr=1e-4", "train.weight_decay=0.01"])
    model = Trainer(cfg, progress=False).model
    rest, dynamics = parameter_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    special = sorted(names[id(p)].rsplit(".", 1)[-1] for p in dynamics["params"])
    assert set(special) == {"log_dt", "log_A_real", "A_imag"} and len(special) == 3 * 5  # one kernel per block
    assert (dynamics["lr"], dynamics["weight_decay"]) == (1e-3, 0.0)
    assert (rest["lr"], rest["weight_decay"]) == (1e-4, 0.01)
    assert len(rest["params"]) + len(dynamics["params"]) == len(list(model.parameters()))
    cfg.train.warmup_steps = 4  # the warmup scales every group alike
    assert lr_at(0, cfg, dynamics["base_lr"]) == pytest.approx(2.5e-4) and lr_at(0, cfg) == pytest.approx(2.5e-5)
    cfg.train.ssm_lr = None
    (only,) = parameter_groups(model, cfg)
    assert only["weight_decay"] == 0.01 and len(only["params"]) == len(list(model.parameters()))
    dit = load_config(None, ["model.name=DiT-Nano/4"])
    assert len(parameter_groups(Trainer(dit, progress=False).model, dit)) == 1  # no SSM, one group


def test_resuming_with_another_ssm_lr_setting_names_the_fix(tmp_path):
    run = tmp_path / "run"
    train(load_config(None, tiny_run(run, *SSM_MODEL, "train.steps=2")), progress=False)
    with pytest.raises(DitkitError, match="resume with the train.ssm_lr it was trained with"):
        train(load_config(None, tiny_run(run, *SSM_MODEL, "train.ssm_lr=null")), resume=True, progress=False)
