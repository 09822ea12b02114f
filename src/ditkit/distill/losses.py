"""CLEAR's distillation loss: the teacher's own objective on its samples, plus output matching
and attention-output matching against the frozen teacher on the very same noisy input.

    L = w_task * L_objective(student) + w_output * MSE(student out, teacher out)
        + w_attention * mean_l MSE(student attention_l, teacher attention_l)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AT_LEAST_0, check_fields, ranged
from ..errors import DitkitError


class AttentionTaps:
    """Records each tapped layer's raw attention output on every call. A tap is (module, "input")
    for the input of an output projection, or (module, "output") for what an attention returns."""

    def __init__(self, taps: list[tuple[nn.Module, str]]):
        self.outputs: list[Tensor] = []
        self._handles = [module.register_forward_pre_hook(self._record_input) if mode == "input"
                         else module.register_forward_hook(self._record_output) for module, mode in taps]

    def _record_input(self, module: nn.Module, args: tuple) -> None:
        self.outputs.append(args[0])

    def _record_output(self, module: nn.Module, args: tuple, output) -> None:
        self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def clear(self) -> None:
        self.outputs = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class PairedDenoiser(nn.Module):
    """Calls the student, and the frozen teacher on the same (x_t, t, cond); remembers both.

    Handing this to an objective's `loss` gives the objective's own noising and target (so a
    DDPM teacher is distilled with the DDPM loss, a flow teacher with flow matching) while the
    teacher sees exactly the input the student saw.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.student_out: Tensor | None = None
        self.teacher_out: Tensor | None = None

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        with torch.no_grad():
            self.teacher_out = self.teacher(x, t, cond)
        self.student_out = self.student(x, t, cond)
        return self.student_out


@dataclass
class LossWeights:
    """Output-heavy by default, not CLEAR's task 1 / output 0.5 / attention 0.5: in the built-in
    distillation settings study (benchmarks/results/study-distillation-settings) these weights gave students 3.2 dB
    closer to their teacher (PSNR 26.7 vs 23.5, 2 seeds) and an FID of 1.32 instead of 2.94 at the
    training size, at the same radius, lr and steps. Pass CLEAR's to reproduce the paper."""

    task: float = ranged(0.1, AT_LEAST_0)  # the teacher's objective (flow matching for FLUX-like teachers)
    output: float = ranged(1.0, AT_LEAST_0)  # MSE(student output, teacher output)
    attention: float = ranged(0.5, AT_LEAST_0)  # mean over tapped layers of MSE(student attention, teacher attention)

    def __post_init__(self):
        """Each weight at least 0 (a negative one rewards moving away from the teacher) and one above 0
        (all 0: the student would never move)."""
        check_fields(self, "weights.")
        if self.task + self.output + self.attention == 0:
            raise DitkitError("config keys weights.task, weights.output and weights.attention are all 0: the "
                              "student would learn nothing; give at least one a positive weight")


def distillation_loss(objective, paired: PairedDenoiser, student_taps: AttentionTaps, teacher_taps: AttentionTaps,
                      x0: Tensor, cond: Tensor | None, generator: torch.Generator,
                      weights: LossWeights) -> tuple[Tensor, dict[str, float]]:
    student_taps.clear()
    teacher_taps.clear()
    task = objective.loss(paired, x0, cond, generator)
    output = F.mse_loss(paired.student_out.float(), paired.teacher_out.float())
    pairs = list(zip(student_taps.outputs, teacher_taps.outputs, strict=True))
    attention = torch.stack([F.mse_loss(s.float(), t.float()) for s, t in pairs]).mean() if pairs else task * 0
    loss = weights.task * task + weights.output * output + weights.attention * attention
    parts = {name: float(value.detach()) for name, value in
             (("loss", loss), ("task", task), ("output", output), ("attention", attention))}
    return loss, parts
