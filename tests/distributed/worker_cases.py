"""The main of the torchrun worker scripts: run every case on every process (gloo, one thread),
and have rank 0 write {case: result} as JSON to argv[1], each case's max_diff the worst process's."""

import json
import sys

import torch
import torch.distributed as dist


def run_cases(cases: dict, run_case) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {name: run_case(name, *case) for name, case in cases.items()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        worst = {name: {**gathered[0][name], "max_diff": max(r[name]["max_diff"] for r in gathered)}
                 for name in cases}
        with open(sys.argv[1], "w") as f:
            json.dump(worst, f, indent=2)
    dist.destroy_process_group()
