"""Teacher samples split over 2 processes (gloo) with a sharded tiny FLUX teacher, for
tests/distill/test_distill.py:

    torchrun --nproc_per_node 2 split_samples_run.py TEACHER OUT

5 samples in chunks of 2: round 1 gives chunk 0 to rank 0 and chunk 1 to rank 1, round 2 chunk 2 to
rank 0 while rank 1 runs a stand-in. Rank 0 writes OUT/calls.json: the chunks each rank generated.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ditkit.distill import samples
from ditkit.distill.diffusers_teacher import DiffusersTeacher
from ditkit.distributed.sharding import shard_model

if __name__ == "__main__":
    teacher_folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    teacher = DiffusersTeacher(teacher_folder, resolution=64, steps=2)
    shard_model(teacher.model, torch.device("cpu"))
    samples.CHUNK = 2
    calls = []
    generate = samples.generate_chunk
    samples.generate_chunk = lambda t, seed, index, size: calls.append([index, size]) or generate(t, seed, index, size)
    samples.teacher_samples(teacher, out / "samples", num=5, seed=3, progress=False, rank=rank, world=world)
    everyone = [None] * world
    dist.all_gather_object(everyone, calls)
    if rank == 0:
        (out / "calls.json").write_text(json.dumps(everyone))
    dist.barrier()
    dist.destroy_process_group()
