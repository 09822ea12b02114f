"""Memory planning for training and distillation (`ditkit info MODEL --train-memory`).

Everything runs on the meta device (shapes, no data), so FLUX's 12B configuration is planned in
seconds on a laptop. Two kinds of figures:

Counted from parameter shapes (bytes per process):
  weights     fp32 master weights of what is trained (AdamW needs them, also under bf16 mixed
              precision); frozen weights at the chosen precision (4 or 2 bytes)
  grads       one fp32 gradient per trained weight
  optimizer   AdamW's two fp32 moments per trained weight (the scalar step counters are left out)
  EMA         an fp32 copy of the trained weights (`ditkit train` keeps one, sharded like the weights
              under FSDP; distillation keeps none)
  bf16 copies under DDP with bf16 autocast, the bf16 casts of the trained weights, which the
              forward saves for backward (2 bytes per weight)
DDP replicates all of it. FSDP (FSDP2's `fully_shard` of every block, then of the root) shards
every parameter along its first dimension into chunks of ceil(rows / P) rows; the figures are for
rank 0, which holds the largest chunk. FSDP adds transient full-size parameters: the root unit
(everything outside the blocks), two blocks (the one computing and the one prefetched) and one
block's unsharded gradients before their reduce-scatter, at the compute precision.

Measured (one image's training step on the meta device, which allocates nothing but knows every
tensor's size; attention runs as the fused flash kernel, as on a GPU: it saves q, k, v, its output
and the log-sum-exp, never the N x N scores):
  step peak    the peak bytes alive during forward + loss + backward above the weights and the
               (already allocated) gradients: saved activations plus the output, the loss and
               backward's temporaries. Measured with `metrics.memory.peak_memory(..., "meta")`, it
               equals the peak of the same step on real CPU tensors byte for byte (tested); it sets
               the images/GPU column (batch 1 scaled linearly).
  saved        what the forward saves for backward (parameters excluded), each storage counted
               once, and where: outside the blocks, in each block, as block inputs.
  checkpointed per-block activation checkpointing (torch.utils.checkpoint, non-reentrant, on every
               block): a block keeps only its inputs and backward recomputes one block at a time.
               Its step peak is measured the same way; its saved figure is outside-block saves +
               every block's inputs + the largest block's saves.
  teacher      distillation only: the frozen teacher's outputs that the loss compares with the
               student's (its attention outputs at every tapped layer, `attention_every` 1, and
               its prediction). The distillation step is the teacher's forward without grad, then
               the student's with, and ditkit's output + attention matching loss.
The loss of a training step is an MSE of the output (the objectives' losses are MSEs of the same
size). A distillation student is measured with the teacher's (stock) attention: CLEAR's flex
kernel on a GPU saves the same tensors (q, k, v, output, log-sum-exp). bf16 activations are
measured with bf16 weights and inputs; autocast's fp32 islands (norms, softmax statistics) are
not modelled. Not included: the CUDA context, NCCL buffers, the allocator's fragmentation and
cached blocks, which come on top. Loading adds no peak of its own under FSDP: a sharded
distillation builds teacher and student on the meta device and reads each process's shards
straight from the files (distributed/sharded_load.py), one tensor's rows in flight.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils._pytree
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..checkpoint import META_KEY, read_header
from ..diffusers.adapters import adapter_for
from ..diffusers.clear import apply_clear, attention_taps, remove_clear
from ..diffusers.folders import diffusers_config_file
from ..diffusion.pipeline import input_size
from ..distill.diffusers_teacher import DiffusersTeacher, FlowDenoiser, flow_models
from ..distill.losses import AttentionTaps
from ..distill.teacher import DitkitTeacher
from ..distributed.sharding import shard_rows
from ..errors import DitkitError
from ..metrics.flops import shapes_only_model
from ..metrics.memory import peak_memory
from ..mixers import swap_mixers
from ..models import NAMED_MODELS, build_model
from ..models.layers import ConditionedBlocks
from ..record import RunRecord

GIB = 2 ** 30
REGIMES = ("train", "distill")
PRECISIONS = ("fp32", "bf16")
STRATEGIES = ("DDP", "FSDP")
BYTES = {"fp32": 4, "bf16": 2}
DIFFUSERS_VAE_SCALE = 8


# -- what is planned -------------------------------------------------------------------------
@dataclass
class Subject:
    """A model on the meta device, and how to run one training forward of it."""

    label: str
    model: nn.Module
    make_inputs: Callable[[int, int], tuple]  # (height, width) in pixels -> forward args, batch 1
    describe_input: Callable[[int, int], str]
    blocks: list[nn.Module]  # the repeated blocks: FSDP units and checkpointing units
    distilled: list[nn.Parameter]  # what distillation trains (attention projections)
    taps: list[tuple[nn.Module, str]]  # where distillation reads attention outputs
    resolution: int  # pixels, the default: the training resolution where known


def load_subject(source: str, mixer: str | None = None, mixer_options: dict | None = None,
                 text_tokens: int | None = None) -> Subject:
    """A named ditkit model, a ditkit checkpoint, or a diffusers transformer (its config.json, its
    folder, or a pipeline folder with a transformer/ subfolder), built on the meta device."""
    if source in NAMED_MODELS:

        return ditkit_subject(shapes_only_model(source, mixer, mixer_options), source, resolution=256)
    path = Path(source)
    if not path.exists():
        raise DitkitError(f"unknown model {source!r}: choose one of {', '.join(NAMED_MODELS)}, a checkpoint, or a "
                          "diffusers transformer config.json or folder")
    config_file = diffusers_config_file(path)
    if config_file is not None:
        return diffusers_subject(config_file, text_tokens)
    model, resolution = checkpoint_on_meta(path, mixer, mixer_options)
    return ditkit_subject(model, source, resolution)


def checkpoint_on_meta(path: Path, mixer: str | None, mixer_options: dict | None) -> tuple[nn.Module, int]:
    """The model a ditkit checkpoint describes, built from its header on the meta device, and its
    training resolution."""
    file, metadata, _ = read_header(path)
    if META_KEY not in metadata:
        raise DitkitError(f"{file} is not a ditkit checkpoint (no model config in its metadata): give a named model, "
                          "a ditkit checkpoint or a diffusers config.json")
    record = RunRecord.from_json(metadata[META_KEY], source=str(file))
    if not hasattr(record.model, "backbone"):
        raise DitkitError(f"{file} holds a diffusers student: plan its transformer's config.json instead")
    with torch.device("meta"):
        model = build_model(record.model)
        if mixer or mixer_options:
            swap_mixers(model, mixer or model.config.mixer, **(mixer_options or {}))
    return model, record.resolution


def ditkit_subject(model: nn.Module, label: str, resolution: int = 256) -> Subject:
    cfg = model.config

    def make_inputs(height: int, width: int) -> tuple:
        h, w = input_size(model, height, width)
        y = torch.zeros(1, dtype=torch.long, device="meta") if cfg.num_classes > 0 else None
        return torch.zeros(1, cfg.in_channels, h, w, device="meta"), torch.zeros(1, device="meta"), y

    def describe_input(height: int, width: int) -> str:
        h, w = input_size(model, height, width)
        return f"{height}x{width} px -> {cfg.in_channels}x{h}x{w} input -> {cfg.tokens(h, w)} tokens"

    blocks = outermost([(f"{name}.{i}", b) for name, m in model.named_modules() if isinstance(m, ConditionedBlocks)
                        for i, b in enumerate(m)])
    # the distiller's own choices; these methods read only the student they are given
    distilled = list(DitkitTeacher.trainable_parameters(None, model).values())
    taps = DitkitTeacher.attention_taps(None, model)
    return Subject(f"{label} ({cfg.backbone}, mixer {cfg.mixer})", model, make_inputs, describe_input, blocks,
                   distilled, taps, resolution)


def outermost(named: list[tuple[str, nn.Module]]) -> list[nn.Module]:
    """The blocks not nested in another block (U-DiT's blocks hold blocks of their own)."""
    names = [name for name, _ in named]
    return [b for name, b in named if not any(name.startswith(other + ".") for other in names)]


def diffusers_subject(config_file: Path, text_tokens: int | None = None) -> Subject:
    """A FLUX or SD3 transformer from its config on the meta device, driven as `ditkit distill`
    drives it (`FlowDenoiser`), with `text_tokens` prompt tokens (default: FLUX 512, SD3 333)."""
    import diffusers

    config = json.loads(config_file.read_text())
    class_name = config["_class_name"]
    if class_name not in flow_models():
        raise DitkitError(f"memory planning drives the transformers {', '.join(flow_models())}, not {class_name}: "
                          "give one of those configs")
    with torch.device("meta"):
        transformer = getattr(diffusers, class_name).from_config(config)
    tokens = text_tokens or adapter_for(transformer, "memory planning").prompt_tokens
    denoiser = FlowDenoiser(transformer, torch.zeros(1, tokens, transformer.config.joint_attention_dim, device="meta"),
                            torch.zeros(1, transformer.config.pooled_projection_dim, device="meta"))
    patch = denoiser.token_patch
    multiple = DIFFUSERS_VAE_SCALE * patch

    def latent_size(height: int, width: int) -> tuple[int, int]:
        if height % multiple or width % multiple:
            raise DitkitError(f"resolution {height}x{width} does not fit this {class_name}: use multiples of "
                              f"{multiple}")
        return height // DIFFUSERS_VAE_SCALE, width // DIFFUSERS_VAE_SCALE

    def make_inputs(height: int, width: int) -> tuple:
        h, w = latent_size(height, width)
        return (torch.zeros(1, denoiser.latent_channels, h, w, device="meta"), torch.zeros(1, device="meta"),
                torch.zeros(1, dtype=torch.long, device="meta"))

    def describe_input(height: int, width: int) -> str:
        h, w = latent_size(height, width)
        return (f"{height}x{width} px -> {denoiser.latent_channels}x{h}x{w} latent (VAE /8) -> "
                f"{h * w // patch ** 2} image + {tokens} text tokens")

    apply_clear(transformer, radius=8)  # which layers the distiller switches and trains
    distilled = list(DiffusersTeacher.trainable_parameters(None, denoiser).values())
    remove_clear(transformer)
    blocks = [b for name, m in transformer.named_children() if name.endswith("blocks") for b in m]
    return Subject(f"{config_file} ({class_name})", denoiser, make_inputs, describe_input, blocks, distilled,
                   attention_taps(transformer), resolution=1024)


# -- state: weights, gradients, optimizer, EMA --------------------------------------------------
def shard_numel(p: Tensor, processes: int) -> int:
    """Elements of rank 0's FSDP2 shard: dim 0 split into chunks of ceil(rows / P)."""
    if p.dim() == 0:
        return p.numel()
    start, stop = shard_rows(p.shape[0], processes, 0)
    return (stop - start) * math.prod(p.shape[1:])


@dataclass
class Roles:
    """Which weights are trained, which are frozen, and whether a frozen teacher is held besides."""

    trained: list[nn.Parameter]
    frozen: list[nn.Parameter]
    teacher: list[nn.Parameter]
    ema: bool


def roles(subject: Subject, regime: str) -> Roles:
    params = list(subject.model.parameters())
    if regime == "train":
        return Roles(params, [], [], ema=True)
    if not subject.distilled:
        raise DitkitError(f"{subject.label} has no attention projections to distil: plan --regime train")
    trained = {id(p) for p in subject.distilled}
    return Roles(subject.distilled, [p for p in params if id(p) not in trained], params, ema=False)


@dataclass
class StateBytes:
    weights: int = 0
    grads: int = 0
    optimizer: int = 0
    ema: int = 0
    bf16_copies: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.ema + self.bf16_copies


def state_bytes(role: Roles, precision: str, strategy: str = "DDP", processes: int = 1) -> StateBytes:
    """Bytes of rank 0's weights, gradients, AdamW moments and EMA (sharded under FSDP)."""
    sharded = strategy == "FSDP"

    def numel(params: Iterable[Tensor]) -> int:
        return sum(shard_numel(p, processes) if sharded else p.numel() for p in params)

    trained = numel(role.trained)
    frozen_bytes = BYTES[precision]
    return StateBytes(weights=4 * trained + frozen_bytes * numel(role.frozen + role.teacher), grads=4 * trained,
                      optimizer=8 * trained, ema=4 * trained if role.ema else 0,
                      bf16_copies=2 * trained if precision == "bf16" and not sharded else 0)


def fsdp_transient_bytes(subject: Subject, role: Roles, precision: str) -> int:
    """Full-size parameters FSDP holds at once: the root unit, two blocks (computing, prefetched) and
    one block's unsharded gradients, at the compute precision."""
    compute = BYTES[precision]
    trained = {id(p) for p in role.trained}
    in_blocks = {id(p) for b in subject.blocks for p in b.parameters()}
    root = sum(p.numel() for p in subject.model.parameters() if id(p) not in in_blocks)
    block_params = max((sum(p.numel() for p in b.parameters()) for b in subject.blocks), default=0)
    block_grads = max((sum(p.numel() for p in b.parameters() if id(p) in trained) for b in subject.blocks), default=0)
    return compute * (root + 2 * block_params + block_grads)


# -- activations: measured on the meta device ---------------------------------------------------
_SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _flash_attention(*args, **kwargs) -> Tensor:
    given = dict(zip(_SDPA_ARGUMENTS, args, strict=False)) | kwargs
    if given.get("enable_gqa"):
        return _stock_sdpa(*args, **kwargs)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        given["query"], given["key"], given["value"], given.get("dropout_p", 0.0), given.get("is_causal", False),
        attn_mask=given.get("attn_mask"), scale=given.get("scale"))[0]


_stock_sdpa = F.scaled_dot_product_attention


@contextmanager
def fused_attention():
    """Runs scaled_dot_product_attention as the fused flash kernel: off GPU, the math path would
    save the N x N attention probabilities, which no GPU kernel keeps. Swapped in `torch.nn.functional`
    (not a TorchFunctionMode) so that checkpointing's recompute in backward sees it too."""
    F.scaled_dot_product_attention = _flash_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _stock_sdpa


def storage_key(t: Tensor) -> int:
    """One key per storage, also on meta (where every data pointer is 0)."""
    return t.untyped_storage()._cdata


@dataclass
class Activations:
    """Bytes per image: what autograd saves for backward, split by where it is saved, and the
    measured peak of a whole training step above the weights and gradients."""

    outside: int = 0  # saved outside the blocks (embedders, final layer, loss inputs)
    per_block: list[int] = field(default_factory=list)  # saved inside each block
    block_inputs: int = 0  # the distinct tensors the blocks take as inputs
    teacher: int = 0  # distillation: the teacher outputs the loss keeps
    peak_full: int = 0  # peak of a training step, without / with per-block checkpointing
    peak_checkpointed: int = 0

    @property
    def full(self) -> int:
        return self.outside + sum(self.per_block) + self.teacher

    @property
    def checkpointed(self) -> int:
        return self.outside + self.block_inputs + max(self.per_block, default=0) + self.teacher


class _SavedBytes:
    """Counts the storages autograd saves, attributed to the block running when they are saved."""

    def __init__(self, subject: Subject, exclude: set[int]):
        self.exclude = exclude
        self.block: int | None = None
        self.saved: dict[int, tuple[int, int | None]] = {}  # storage -> (bytes, block or None)
        self.inputs: dict[int, int] = {}  # storage -> bytes, of tensors entering blocks
        self.keep: list[Tensor] = []  # holds what was counted alive, so keys are never reused
        self.handles = [h for i, b in enumerate(subject.blocks) for h in (
            b.register_forward_pre_hook(self._enter(i), with_kwargs=True),
            b.register_forward_hook(self._leave, always_call=True))]

    def _enter(self, index: int):
        def hook(module, args, kwargs):
            for t in torch.utils._pytree.tree_leaves((args, kwargs)):
                if isinstance(t, Tensor) and storage_key(t) not in self.exclude:
                    self.inputs.setdefault(storage_key(t), t.untyped_storage().nbytes())
                    self.keep.append(t)
            self.block = index
        return hook

    def _leave(self, module, args, output) -> None:
        self.block = None

    def pack(self, t: Tensor) -> Tensor:
        key = storage_key(t)
        if key not in self.exclude and key not in self.saved:
            self.saved[key] = (t.untyped_storage().nbytes(), self.block)
            self.keep.append(t)
        return t

    def result(self, blocks: int) -> Activations:
        per_block = [0] * blocks
        outside = 0
        for nbytes, block in self.saved.values():
            if block is None:
                outside += nbytes
            else:
                per_block[block] += nbytes
        inputs = sum(n for key, n in self.inputs.items() if key not in self.saved or self.saved[key][1] is not None)
        return Activations(outside, per_block, inputs)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@contextmanager
def training_setup(subject: Subject, height: int, width: int, role: Roles, precision: str):
    """The meta model at the compute precision, gradients on for the trained weights only and
    already allocated (as from the second step on); yields one image's forward inputs."""
    model = subject.model
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    original = next(model.parameters()).dtype
    trained = {id(p) for p in role.trained}
    model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
        p.grad = torch.zeros_like(p) if id(p) in trained else None
    try:
        yield tuple(x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point() else x
                    for x in subject.make_inputs(height, width))
    finally:
        for p in model.parameters():
            p.grad = None
        model.to(original).requires_grad_(True)


@contextmanager
def checkpointed_blocks(blocks: list[nn.Module]):
    """Per-block activation checkpointing (torch.utils.checkpoint, non-reentrant), for a while."""
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False, preserve_rng_state=False)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def training_step(subject: Subject, inputs: tuple, distill: bool) -> None:
    """One image's forward and backward. The loss stands in for the objective: an MSE of the output
    (training), or distillation's output and attention matching against the frozen teacher's
    outputs, computed first without grad (the same meta weights play teacher and student)."""
    model = subject.model
    if not distill:
        model(*inputs).float().square().mean().backward()
        return
    teacher_taps = AttentionTaps(subject.taps)
    with torch.no_grad():
        target = model(*inputs)
    teacher_taps.remove()
    student_taps = AttentionTaps(subject.taps)
    out = model(*inputs)
    student_taps.remove()
    pairs = list(zip(student_taps.outputs, teacher_taps.outputs, strict=True))
    loss = F.mse_loss(out.float(), target.float())
    if pairs:
        loss = loss + torch.stack([F.mse_loss(s.float(), t.float()) for s, t in pairs]).mean()
    loss.backward()


def measure_activations(subject: Subject, height: int, width: int, role: Roles, precision: str = "fp32",
                        distill: bool = False) -> Activations:
    """Saved-for-backward bytes of one image's training forward, and the peaks of its training step
    with and without checkpointing, all on the meta device (see the module docstring)."""
    try:
        with training_setup(subject, height, width, role, precision) as inputs, fused_attention():
            model = subject.model
            exclude = {storage_key(t) for t in (*model.parameters(), *model.buffers())}
            exclude |= {storage_key(x) for x in inputs if isinstance(x, Tensor)}
            counter = _SavedBytes(subject, exclude)
            try:
                with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
                    model(*inputs)
            finally:
                counter.remove()
            activations = counter.result(len(subject.blocks))
            if distill:
                activations.teacher = teacher_target_bytes(subject, inputs)
            activations.peak_full = peak_memory(lambda: training_step(subject, inputs, distill), "meta")
            with checkpointed_blocks(subject.blocks):
                activations.peak_checkpointed = peak_memory(lambda: training_step(subject, inputs, distill), "meta")
    except (RuntimeError, NotImplementedError) as error:
        raise DitkitError(f"{subject.label} does not run on the meta device ({str(error).splitlines()[0]}): its "
                          "activations cannot be planned; measure a real step with ditkit bench") from error
    return activations


@torch.no_grad()
def teacher_target_bytes(subject: Subject, inputs: tuple) -> int:
    """Bytes of what the frozen teacher hands the distillation loss: its attention outputs at every
    tapped layer (`attention_every` 1) and its prediction."""
    taps = AttentionTaps(subject.taps)
    try:
        out = subject.model(*inputs)
    finally:
        taps.remove()
    kept = {storage_key(t): t.untyped_storage().nbytes() for t in [*taps.outputs, out]}
    return sum(kept.values())


# -- the plan ----------------------------------------------------------------------------------
@dataclass
class PlanRow:
    processes: int
    strategy: str
    state: StateBytes
    transient: int
    fits_full: int  # images per process that fit the device memory, without / with checkpointing
    fits_checkpointed: int

    @property
    def total(self) -> int:
        return self.state.total + self.transient


@dataclass
class MemoryPlan:
    subject: Subject
    regime: str
    precision: str
    height: int
    width: int
    device_gib: float
    trained_params: int
    all_params: int
    activations: Activations
    rows: list[PlanRow]


def images_that_fit(free: float, per_image: int) -> int:
    return max(0, int(free // per_image)) if per_image else 0


def plan_memory(subject: Subject, height: int, width: int, processes: Iterable[int] = (1, 8, 64),
                regime: str = "train", precision: str = "fp32", device_gib: float = 80.0) -> MemoryPlan:
    """State bytes per process under DDP and FSDP at each P, and activations per image."""
    if regime not in REGIMES:
        raise DitkitError(f"unknown regime {regime!r}: use {' or '.join(REGIMES)}")
    if precision not in PRECISIONS:
        raise DitkitError(f"unknown precision {precision!r}: use {' or '.join(PRECISIONS)}")
    processes = list(processes)
    if not processes or min(processes) < 1:
        raise DitkitError(f"processes must be whole numbers >= 1, got {processes}: e.g. --processes 1 8 64")
    role = roles(subject, regime)
    activations = measure_activations(subject, height, width, role, precision, distill=regime == "distill")
    transient = fsdp_transient_bytes(subject, role, precision)
    rows = []
    for P in processes:
        for strategy in STRATEGIES:
            state = state_bytes(role, precision, strategy, P)
            extra = transient if strategy == "FSDP" else 0
            free = device_gib * GIB - state.total - extra
            rows.append(PlanRow(P, strategy, state, extra, images_that_fit(free, activations.peak_full),
                                images_that_fit(free, activations.peak_checkpointed)))
    return MemoryPlan(subject, regime, precision, height, width, device_gib, sum(p.numel() for p in role.trained),
                      sum(p.numel() for p in subject.model.parameters()), activations, rows)


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def format_plan(plan: MemoryPlan) -> str:
    """`ditkit info --train-memory`'s table."""
    a, s = plan.activations, plan.subject
    what = {"train": "train: every weight trained, AdamW, fp32 EMA",
            "distill": "distill: frozen teacher + student, attention projections trained, AdamW, no EMA"}[plan.regime]
    frozen = "" if plan.regime == "train" else f", frozen weights {plan.precision}"
    compute = {"fp32": "fp32", "bf16": "bf16 autocast, fp32 master weights"}[plan.precision]
    teacher = f" + teacher targets {gib(a.teacher)}" if a.teacher else ""
    lines = [
        f"model        {s.label}",
        f"input        {s.describe_input(plan.height, plan.width)}",
        f"parameters   {plan.all_params / 1e6:.2f}M, trained {plan.trained_params / 1e6:.2f}M",
        f"regime       {what}; compute {compute}{frozen}",
        "activations  GiB per image, measured on meta (fused attention); no checkpointing / per-block checkpointing:",
        f"             peak of a training step above weights and grads {gib(a.peak_full)} / {gib(a.peak_checkpointed)}",
        f"             saved for backward {gib(a.full)} / {gib(a.checkpointed)} (= outside blocks {gib(a.outside)} + "
        f"block inputs {gib(a.block_inputs)} + largest block {gib(max(a.per_block, default=0))}{teacher})",
        f"state        GiB per process (rank 0); images/GPU: the per-process batch whose step peaks fit "
        f"{plan.device_gib:g} GiB with the state (no checkpointing / checkpointing)",
        f"{'P':>6} {'strategy':>8} {'weights':>8} {'grads':>8} {'AdamW':>8} {'EMA':>8} {'bf16 copy':>9} "
        f"{'FSDP tmp':>8} {'total':>8}  {'images/GPU':>10}"]
    for r in plan.rows:
        st = r.state
        fits = f"{r.fits_full} / {r.fits_checkpointed}"
        lines.append(f"{r.processes:>6} {r.strategy:>8} {gib(st.weights):>8} {gib(st.grads):>8} "
                     f"{gib(st.optimizer):>8} {gib(st.ema):>8} {gib(st.bf16_copies):>9} {gib(r.transient):>8} "
                     f"{gib(r.total):>8}  {fits:>10}")
    lines.append("not included: CUDA context, NCCL buffers, allocator fragmentation and cache")
    return "\n".join(lines)
