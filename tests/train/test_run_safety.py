"""Nothing lost, ever (issue 16): a run folder belongs to one run, settings are checked before any
work, resume refuses a changed setup, diverged weights are never saved, and a full disk or a
killed write leaves a clear message and no debris."""

import errno
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import ditkit.checkpoint as checkpoint_module
from ditkit import DitkitError
from ditkit.checkpoint import load_checkpoint, save_checkpoint
from ditkit.train import load_config, train
from ditkit.train.loop import MetricsLog
from helpers import tiny_run


def steps_logged(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def step_folders(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step run that the tests below only read (or are refused on)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(load_config(None, tiny_run(run, "train.steps=2")), progress=False)
    return run


# ---------------------------------------------------------------- 1. one run per folder

def test_a_folder_held_by_another_process_is_refused_naming_its_pid(tmp_path):
    from ditkit.files import LOCK_NAME

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ditkit.files import FolderLock\n"
                               f"with FolderLock({str(run)!r}, 'holder'):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DitkitError, match=f"is in use by process {holder.pid} on .*holder.*another output folder"):
            train(load_config(None, tiny_run(run)), progress=False)
        assert not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match=f"took over the lock left by process {holder.pid}"):
        train(load_config(None, tiny_run(run, "train.steps=2")), progress=False)  # killed holder: stale lock
    assert not (run / LOCK_NAME).exists()  # released at the end


def test_two_train_commands_racing_on_one_folder_give_one_run(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "ditkit.cli.main", "train", "digits", *tiny_run(run, "train.steps=6"),
               "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    racers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for _ in range(2)]
    results = [(racer.wait(timeout=300), racer.stderr.read()) for racer in racers]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refusal = next(err for code, err in results if code == 2)
    assert ("is in use by process" in refusal or "holds a previous run" in refusal) and refusal.count("\n") == 1
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6] and step_folders(run) == ["step_0000002", "step_0000004",
                                                                             "step_0000006"]


def test_a_finished_run_folder_is_refused_without_resume_and_replaced_with_overwrite(tmp_path):
    run = tmp_path / "run"
    train(load_config(None, tiny_run(run)), progress=False)
    with pytest.raises(DitkitError, match="holds a previous run .*checkpoints.*--resume.*--overwrite"):
        train(load_config(None, tiny_run(run, "train.steps=2")), progress=False)
    assert steps_logged(run) == [1, 2, 3, 4]  # untouched
    train(load_config(None, tiny_run(run, "train.steps=2")), progress=False, overwrite=True)
    assert steps_logged(run) == [1, 2] and step_folders(run) == ["step_0000002"]
    with pytest.raises(DitkitError, match="--resume and --overwrite contradict"):
        train(load_config(None, tiny_run(run)), resume=True, overwrite=True, progress=False)


# ---------------------------------------------------------------- 2. every setting checked when the config loads

@pytest.mark.parametrize("override,message", [
    ("train.grad_accum=0", "train.grad_accum must be at least 1, got 0"),
    ("train.ckpt_every=0", "train.ckpt_every must be at least 1"),
    ("train.log_every=0", "train.log_every must be at least 1"),
    ("train.sample_every=0", "train.sample_every must be at least 1"),
    ("train.batch_size=-1", "train.batch_size must be at least 1"),
    ("train.steps=0", "train.steps must be at least 1"),
    ("train.lr=0", "train.lr must be greater than 0"),
    ("train.lr=.nan", "train.lr must be greater than 0, got nan"),
    ("train.lr=-1e-4", "train.lr must be greater than 0"),
    ("train.ema_decay=1", "train.ema_decay must be in [0, 1)"),
    ("train.ema_decay=-0.5", "train.ema_decay must be in [0, 1)"),
    ("train.mixed_precision=fp8", "train.mixed_precision must be one of no, fp16, bf16"),
    ("data.resolution=0", "data.resolution must be at least 1"),
    ("diffusion.sampler=ddim", "diffusion.sampler 'ddim' does not fit the flow objective: use euler"),
    ("diffusion.sample_steps=0", "diffusion.sample_steps must be a whole number of at least 1"),
])
def test_impossible_settings_fail_when_the_config_loads(override, message):
    with pytest.raises(DitkitError, match=message.replace("[", r"\[").replace(")", r"\)")):
        load_config(None, [override])


# ---------------------------------------------------------------- 3. resume refuses a changed setup

@pytest.mark.parametrize("override,field", [
    ("train.seed=1", "train.seed 0 -> 1"), ("data.resolution=32", "data.resolution 16 -> 32"),
    ("diffusion.objective=ddpm", "diffusion.objective 'flow' -> 'ddpm'"),
])
def test_resume_refuses_settings_that_break_exact_resume(finished_run, override, field):
    with pytest.raises(DitkitError, match=f"trained with other settings \\({field}\\).*resume with them"):
        train(load_config(None, tiny_run(finished_run, "train.steps=4", override)), resume=True, progress=False)
    assert step_folders(finished_run) == ["step_0000002"]


# ---------------------------------------------------------------- 4. divergence

def test_weights_that_diverged_are_not_saved_as_a_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(DitkitError, match="weights diverged by step 1 .*no checkpoint was written yet: lower train.lr"):
        train(load_config(None, tiny_run(run, "train.lr=1e20", "train.ckpt_every=1")), progress=False)
    assert not (run / "checkpoints").exists()


def test_an_exploding_loss_warns_and_an_overflowing_lr_is_one_line(tmp_path):
    with pytest.warns(UserWarning, match="loss .* at step 2 is over 1000x its first value.*diverging; lower train.lr"):
        train(load_config(None, tiny_run(tmp_path / "a", "train.lr=1e6", "train.steps=2")), progress=False)
    with pytest.raises(DitkitError, match="optimizer step 1 overflows .*train.lr=1e\\+38 is far too large"):
        train(load_config(None, tiny_run(tmp_path / "b", "train.lr=1e38")), progress=False)


def test_save_checkpoint_refuses_non_finite_weights_naming_the_last_good_one(finished_run, tmp_path):
    model, record = load_checkpoint(finished_run)
    root = tmp_path / "checkpoints"
    good = save_checkpoint(root, 1, model=model, ema=None, optimizer=torch.optim.SGD(model.parameters(), lr=1),
                           record=record, train_state={})
    with torch.no_grad():
        model.final_layer.linear.weight[0, 0] = float("nan")
    with pytest.raises(DitkitError, match=f"weights of step 2 hold inf or NaN .*last good checkpoint is {good}"):
        save_checkpoint(root, 2, model=model, ema=None, optimizer=torch.optim.SGD(model.parameters(), lr=1),
                        record=record, train_state={})


# ---------------------------------------------------------------- 5. disk full, killed writes

def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_orphan(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(load_config(None, tiny_run(run, "train.steps=2")), progress=False)

    def full_disk(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"x" * 1000)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    with pytest.raises(DitkitError, match=r"could not write .*step_0000004/model.safetensors: the disk is full; "
                                          r"free space .*; the last complete checkpoint is .*step_0000002: then run "
                                          r"again with --resume"):
        train(load_config(None, tiny_run(run)), resume=True, progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000002"]


def test_a_full_disk_elsewhere_in_the_run_is_one_line(tmp_path, monkeypatch):
    def full_disk(self, step, **values):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(MetricsLog, "write", full_disk)
    with pytest.raises(DitkitError, match="could not write .*metrics.jsonl: the disk is full; .*no checkpoint was "
                                          "written yet: then start again with --overwrite"):
        train(load_config(None, tiny_run(tmp_path / "run")), progress=False)


def test_what_killed_writes_left_is_removed_before_the_run_writes(tmp_path):
    run = tmp_path / "run"
    train(load_config(None, tiny_run(run, "train.steps=2")), progress=False)
    debris = [run / "checkpoints" / ".tmp-step_0000004-999", run / "checkpoints" / ".remove-step_0000001-999",
              run / "checkpoints" / "step_0000003"]  # killed: while writing, while pruning, during a removal
    for folder in debris:
        folder.mkdir()
    (debris[0] / "model.safetensors").write_bytes(b"x" * 1000)
    (run / ".config.json.tmp999").write_text("{")
    with pytest.warns(UserWarning, match="removing the incomplete checkpoint .*step_0000003"):
        train(load_config(None, tiny_run(run)), resume=True, progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000002", "step_0000004"]
    assert not (run / ".config.json.tmp999").exists()


def test_a_torn_metrics_line_left_by_a_kill_does_not_stop_resume(tmp_path):
    run = tmp_path / "run"
    train(load_config(None, tiny_run(run, "train.steps=2")), progress=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')
    with pytest.warns(UserWarning, match="torn last line"):
        train(load_config(None, tiny_run(run)), resume=True, progress=False)
    assert steps_logged(run) == [1, 2, 3, 4]


# ---------------------------------------------------------------- 6. damaged checkpoints: one line each

def copy_checkpoint(finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run, run / "checkpoints" / "step_0000002"


@pytest.mark.parametrize("damage,message", [
    (lambda ckpt: (ckpt / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    (lambda ckpt: (ckpt / "training_state.json").unlink(), "training state .*training_state.json is missing"),
    (lambda ckpt: (ckpt / "training_state.json").write_text('{"step": 2, "se'), "training_state.json is not valid"),
    (lambda ckpt: torch.save({"payload": time.struct_time((0,) * 9)}, ckpt / "optimizer.pt"),
     "optimizer.pt is damaged or holds objects ditkit does not load"),
    (lambda ckpt: (ckpt / "training_state.json").write_text("{}"), "has step None, not a whole number"),
    (lambda ckpt: (ckpt / "training_state.json").write_text("[2]"), "training_state.json holds a list"),
    (lambda ckpt: (ckpt / "training_state.json").write_text('{"step": "sixty"}'), "has step 'sixty'"),
    (lambda ckpt: (ckpt / "training_state.json").write_text('{"step": -5}'), "has step -5, not a whole number"),
    (lambda ckpt: rewrite_optimizer(ckpt, lambda s: s["state"][0]["exp_avg_sq"].fill_(float("nan"))),
     r"optimizer.pt holds inf or NaN optimizer state \(parameter 0, exp_avg_sq\)"),
    (lambda ckpt: rewrite_optimizer(ckpt, lambda s: s["state"][0].update(exp_avg=torch.zeros(3, 3))),
     r"holds exp_avg of shape \(3, 3\) for a parameter of shape .*another model's optimizer"),
    (lambda ckpt: rewrite_optimizer(ckpt, lambda s: s["param_groups"][0]["params"].pop()),
     "holds state for .* parameters in group 0, this model has"),
])
def test_resuming_a_damaged_checkpoint_is_one_line_before_any_step(finished_run, tmp_path, damage, message):
    run, ckpt = copy_checkpoint(finished_run, tmp_path)
    damage(ckpt)
    with pytest.raises(DitkitError, match=message) as error:
        train(load_config(None, tiny_run(run)), resume=True, progress=False)
    assert "\n" not in str(error.value) and steps_logged(run) == [1, 2]


def test_nan_weights_and_a_lost_ema_are_refused_when_loading(finished_run, tmp_path):
    from safetensors.torch import load_file, save_file

    run, ckpt = copy_checkpoint(finished_run, tmp_path)
    (ckpt / "ema.safetensors").unlink()
    with pytest.raises(DitkitError, match="has no ema.safetensors .*--no-ema"):
        load_checkpoint(run)
    load_checkpoint(run, ema=False)  # the raw weights, when asked for
    tensors = load_file(ckpt / "model.safetensors")
    tensors["final_layer.linear.weight"][0, 0] = float("nan")
    metadata = {"ditkit": json.dumps(load_checkpoint(run, ema=False)[1].to_dict())}
    save_file(tensors, ckpt / "model.safetensors", metadata=metadata)
    with pytest.raises(DitkitError, match="holds inf or NaN weights .*final_layer.linear.weight.*earlier checkpoint"):
        load_checkpoint(run, ema=False)


def test_a_folder_lock_is_exclusive_within_one_process_too(tmp_path):
    from ditkit.files import FolderLock

    with FolderLock(tmp_path, "first"):
        with pytest.raises(DitkitError, match=f"in use by process {os.getpid()} .*first"):
            FolderLock(tmp_path, "second").__enter__()
    with FolderLock(tmp_path, "again"):
        pass


# ---------------------------------------------------------------- 7. model fields the data sets

@pytest.mark.parametrize("override,message", [
    ("model.args.num_classes=5", r"num_classes=5 contradicts the data \(digits has 10 classes\).*or set 10"),
    ("model.args.in_channels=3", r"in_channels=3 contradicts the data \(digits has 1 channel\(s\)\).*or set 1"),
    ("model.args.learn_sigma=true", "learn_sigma=True contradicts the objective"),
])
def test_model_fields_that_contradict_the_data_are_refused_and_agreeing_ones_taken(tmp_path, override, message):
    from ditkit.train.trainer import Trainer

    with pytest.raises(DitkitError, match=message):
        Trainer(load_config(None, tiny_run(tmp_path / "run", override)), progress=False)
    assert not (tmp_path / "run").exists()
    agreeing = Trainer(load_config(None, tiny_run(tmp_path / "run", "model.args.num_classes=10",
                                                  "model.args.in_channels=1")), progress=False)
    assert (agreeing.model_config.num_classes, agreeing.model_config.in_channels) == (10, 1)


# ---------------------------------------------------------------- 8. checkpoints verified when they load

def flip_last_weight_byte(file):
    """Flip the lowest mantissa bit of the file's last float32 (a finite value stays finite)."""
    data = bytearray(file.read_bytes())
    data[-4] ^= 1
    file.write_bytes(bytes(data))


def rewrite_optimizer(ckpt, change):
    """Change optimizer.pt's state with `change(state)` and record the new file's checksum, as a run that
    saved that state would have."""
    from ditkit.checkpoint import file_checksum

    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    change(saved)
    torch.save(saved, ckpt / "optimizer.pt")
    state = json.loads((ckpt / "training_state.json").read_text())
    state["checksums"]["optimizer.pt"] = file_checksum(ckpt / "optimizer.pt")
    (ckpt / "training_state.json").write_text(json.dumps(state))


def test_checkpoints_carry_checksums_and_a_flipped_bit_is_refused_by_every_load(finished_run, tmp_path, capsys):
    from safetensors import safe_open

    from helpers import run_cli

    run, ckpt = copy_checkpoint(finished_run, tmp_path)
    with safe_open(str(ckpt / "ema.safetensors"), framework="pt") as f:
        assert set(json.loads(f.metadata()["ditkit.crc32"])) == set(f.keys())
    assert "optimizer.pt" in json.loads((ckpt / "training_state.json").read_text())["checksums"]
    flip_last_weight_byte(ckpt / "ema.safetensors")
    with pytest.raises(DitkitError, match="ema.safetensors is damaged: tensor .* does not match the checksum"):
        load_checkpoint(run)
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(run), "--out", str(tmp_path / "s.png"))
    assert code == 2 and "does not match the checksum" in err and err.count("\n") == 1
    assert not (tmp_path / "s.png").exists()
    with pytest.raises(DitkitError, match="ema.safetensors is damaged"):
        train(load_config(None, tiny_run(run)), resume=True, progress=False)
    assert steps_logged(run) == [1, 2]
    run, ckpt = copy_checkpoint(finished_run, tmp_path / "second")
    flip_last_weight_byte(ckpt / "optimizer.pt")
    with pytest.raises(DitkitError, match="optimizer.pt is damaged: its bytes do not match the checksum"):
        train(load_config(None, tiny_run(run)), resume=True, progress=False)


def test_a_checkpoint_from_before_checksums_loads_without_a_word(finished_run, tmp_path):
    import warnings

    from safetensors.torch import load_file, save_file

    run, ckpt = copy_checkpoint(finished_run, tmp_path)
    for name in ("model.safetensors", "ema.safetensors"):
        metadata = {"ditkit": json.dumps(load_checkpoint(run, ema=False)[1].to_dict())}
        save_file(load_file(ckpt / name), ckpt / name, metadata=metadata)
    state = json.loads((ckpt / "training_state.json").read_text())
    del state["checksums"]
    (ckpt / "training_state.json").write_text(json.dumps(state))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(run)
    train(load_config(None, tiny_run(run)), resume=True, progress=False)
    assert steps_logged(run) == [1, 2, 3, 4]



def test_non_finite_weights_are_refused_before_any_step(finished_run, tmp_path):
    from safetensors.torch import load_file, save_file

    run, ckpt = copy_checkpoint(finished_run, tmp_path)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["final_layer.linear.weight"][0, 0] = float("inf")
    metadata = {"ditkit": json.dumps(load_checkpoint(run, ema=False)[1].to_dict())}
    save_file(tensors, ckpt / "model.safetensors", metadata=metadata)
    with pytest.raises(DitkitError, match="model.safetensors holds inf or NaN weights .*final_layer.linear.weight"):
        train(load_config(None, tiny_run(run)), resume=True, progress=False)
    assert steps_logged(run) == [1, 2]


def test_a_vae_for_other_images_is_refused_before_encoding(tmp_path):
    from tiny_diffusers import tiny_vae

    tiny_vae().save_pretrained(tmp_path / "vae")  # 3-channel images; digits have 1
    with pytest.raises(DitkitError, match="encodes 3-channel images and digits has 1-channel ones.*data.vae=null"):
        train(load_config(None, tiny_run(tmp_path / "run", f"data.vae={tmp_path / 'vae'}",
                                         f"data.cache_dir={tmp_path / 'cache'}")), progress=False)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
