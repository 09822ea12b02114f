"""A sharded (FSDP2) training run killed for real, for tests/train/test_sharding.py, under torchrun:

    torchrun --nproc_per_node 2 killed_run.py kill OUT     4 steps, checkpoint every 2: every process is
                                                         SIGKILLed while the step-4 checkpoint is being
                                                         written (its shards on disk, not yet in place)
    torchrun --nproc_per_node 2 killed_run.py resume OUT   ditkit train --resume on the same folder
"""

import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist

from ditkit.cli.main import main
from ditkit.distributed import sharding
from helpers import tiny_run

TRAIN = ["train.num_samples=0", "train.batch_size=2", "train.sharding=fsdp", "train.activation_checkpointing=true",
         "train.steps=4"]


def die_while_writing_step_4():
    """Every process writes its step-4 shards into the staging folder, then is killed (no Python
    cleanup, no lock release but the kernel's), before the main process could rename the folder."""
    write = sharding.save_sharded

    def write_then_die(folder, *args, **kwargs):
        write(folder, *args, **kwargs)
        if "step_0000004" in str(folder):
            os.kill(os.getpid(), signal.SIGKILL)

    sharding.save_sharded = write_then_die


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    if mode == "kill":
        die_while_writing_step_4()
    extra = ["--resume"] if mode == "resume" else []
    code = main(["train", "digits", *tiny_run(out, *TRAIN), "--no-progress", *extra])
    assert code == 0, f"ditkit train exited with {code}"
    dist.barrier()
    dist.destroy_process_group()
