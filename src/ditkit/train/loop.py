"""What the training and the distillation loops share: per-step random generators, the resumable
batch order, and the metrics log.

Both loops resume exactly because every random draw of step s comes from a generator seeded by
(seed, s, ...) and the batch order is a pure function of (seed, position).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

from ..files import atomic_write_text, read_jsonl


def step_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of integers (seed, step, micro-batch, rank)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=step_generator(seed, epoch, 0x5EED))


class StepBatchSampler(Sampler):
    """Micro-batches of a shuffled, endless stream of dataset indices, from micro-batch `start`.

    Position j of the stream is epoch j // n, slot j % n; process `rank` of `world` takes its own
    slice of each global micro-batch. A pure function of its arguments, so resume needs only `start`.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world

    def indices(self, micro: int) -> list[int]:
        first = (micro * self.world + self.rank) * self.batch_size
        positions = range(first, first + self.batch_size)
        return [int(_epoch_order(self.n, self.seed, j // self.n)[j % self.n]) for j in positions]

    def __iter__(self):
        return (self.indices(m) for m in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class MetricsLog:
    """Metrics as JSON lines (and TensorBoard when it is installed)."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                pass

    def drop_after(self, step: int) -> None:
        """On resume: forget records past the checkpoint, which the run is about to redo (and a
        torn last line, which the crash that stopped the run may have left)."""
        if self.enabled and self.path.is_file():
            kept = [record for record in read_jsonl(self.path) if record["step"] <= step]
            atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def write(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(f"train/{key}", value, step)

    def plot(self) -> None:
        """Loss curve of the whole run (resumed parts included) as loss.png beside the metrics."""
        if not self.enabled or not self.path.is_file():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = read_jsonl(self.path)
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot([r["step"] for r in records], [r["loss"] for r in records])
        ax.set(xlabel="step", ylabel="training loss", yscale="log", title=self.path.parent.name)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.path.with_name("loss.png"))
        plt.close(fig)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
