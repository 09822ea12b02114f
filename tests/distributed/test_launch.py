"""The one process-group lifecycle: joined and left together on success, kept after an error."""

import pytest
import torch.distributed as dist

from ditkit import DitkitError
from ditkit.distributed.launch import process_group, require_process_group, sampling_session, sharded_processes


@pytest.fixture
def torchrun_env(monkeypatch):
    """What torchrun --nproc_per_node 1 sets."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29531"}.items():
        monkeypatch.setenv(key, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_without_joining_a_process_is_alone_and_main():
    with process_group("cpu", join=False) as processes:
        assert (processes.device, processes.rank, processes.world_size, processes.is_main) == ("cpu", 0, 1, True)
        assert not dist.is_initialized()


def test_a_group_formed_here_is_left_after_the_work(torchrun_env):
    with pytest.raises(DitkitError, match="torchrun --nproc_per_node N"):
        require_process_group("distill")
    with sharded_processes("fsdp", "cpu") as processes:
        assert dist.is_initialized() and require_process_group("distill") == (0, 1) and processes.is_main
    assert not dist.is_initialized()


def test_after_an_error_the_group_is_kept_for_torchrun_to_stop(torchrun_env):
    with pytest.raises(RuntimeError, match="boom"), process_group("cpu"):
        raise RuntimeError("boom")
    assert dist.is_initialized()


def test_a_group_that_existed_before_is_not_left(torchrun_env):
    dist.init_process_group("gloo")
    with process_group("cpu") as processes:
        assert processes.world_size == 1
    assert dist.is_initialized()


def test_unsharded_runs_and_one_process_patch_sampling_form_no_group(torchrun_env):
    with sharded_processes("none", "cpu"), sampling_session("patch", "cpu") as session:
        assert session.mode == "patch" and session.world_size == 1 and not dist.is_initialized()
    with pytest.raises(DitkitError, match="unknown --parallel 'strips'"), sampling_session("strips"):
        pass
