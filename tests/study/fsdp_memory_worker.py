"""Run by test_train_memory under torch.distributed.run (2 processes, gloo): a tiny DiT sharded with
FSDP2 (`fully_shard` on every block, then the root), one AdamW step; each rank writes the bytes of
the storages it holds for parameters, gradients and AdamW moments."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
from ditkit.study.memory_plan import ditkit_subject  # noqa: E402
from helpers import tiny_backbone  # noqa: E402


def storage_bytes(tensors) -> int:
    storages = {}
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        storages[local.untyped_storage()._cdata] = local.untyped_storage().nbytes()
    return sum(storages.values())


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    # the class embedding table has 4 + 1 rows: rank 0 holds 3 of them, rank 1 two (or a padded 3)
    model = tiny_backbone("dit", depth=2, hidden_size=40, num_heads=2, num_classes=4)
    for block in ditkit_subject(model, "tiny").blocks:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 3])
    model(x, t, y).square().mean().backward()
    optimizer.step()
    params = list(model.parameters())
    moments = [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    result = {"weights": storage_bytes(params), "grads": storage_bytes(p.grad for p in params),
              "optimizer": storage_bytes(moments)}
    with open(f"{out}.{dist.get_rank()}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
