"""`ssm`: the gated bidirectional state space mixer of DiffuSSM (arXiv 2311.18257).

No attention: tokens are mixed by long convolutions whose kernels come from an S4D state space
model (diagonal complex state, zero-order-hold discretisation), one kernel per channel, applied
with FFTs in fp32, O(L log L) in the sequence length L. Half of the channels scan forward (each
output sees the past), the other half backward (each output sees the future).

The mixer is the paper's block body, with an optional hourglass of factor M:

    a    = act(W0 x)                           x: (B, J, D), J tokens
    u    = act(W_up a)                         each token -> M consecutive positions of 2D channels
    y    = [S4D_fwd(u[:D]), S4D_bwd(u[D:])]    full length L = J*M
    s    = act(W_down y)                       per-offset maps 2D -> 2D/M, the M offsets concatenated
    out  = W3( act(W2 s) * act(W1 x) )         gated by the mixer input

With M = 1 (the default) it is a plain gated bidirectional SSM on the token grid, usable in any
backbone. Global tokens are scanned first, then the image tokens in row-major order: the forward
scan carries them into every image token, the backward scan ends on them.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DitkitError
from .base import Grid, TokenMixer
from .registry import register_mixer


def full_precision(device: torch.device):
    """A context that turns autocast off on this device type (no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def complex_powers(dtA: Tensor, exponents: Tensor) -> tuple[Tensor, Tensor]:
    """Real and imaginary parts of exp(dtA * e) for each exponent e: (C, n, E) each. Real exp, cos
    and sin: a complex exp is several times slower on CPU."""
    decay = torch.exp(dtA.real.unsqueeze(-1) * exponents)
    phase = dtA.imag.unsqueeze(-1) * exponents
    return decay * torch.cos(phase), decay * torch.sin(phase)


def vandermonde_kernel(coefficients: Tensor, dtA: Tensor, length: int) -> Tensor:
    """K[c, l] = 2 Re(sum_n coefficients[c, n] * z[c, n]^l) with z = exp(dtA), for l < length.

    Never builds the (C, n, L) Vandermonde matrix. Writing l = a*S + b with S = ceil(sqrt(L)),
    z^l = z^(aS) * z^b, so K[c, aS + b] = 2 Re(sum_n P[c, a, n] Q[c, n, b]) with P = coefficients *
    z^(aS) and Q = z^b: one (L/S x n) @ (n x S) product per channel, its real part as one real
    matmul over [Re, Im]. Memory and exponentials O(C n sqrt(L)); the 2 C n L multiply-adds run
    in BLAS and the FLOP counter sees them.
    """
    S = math.isqrt(length - 1) + 1  # ceil(sqrt(length))
    rows = -(-length // S)
    steps = torch.arange(S, device=dtA.device, dtype=torch.float32)
    fine_re, fine_im = complex_powers(dtA, steps)  # z^b
    coarse_re, coarse_im = complex_powers(dtA, steps[:rows] * S)  # z^(aS)
    c_re, c_im = coefficients.real.unsqueeze(-1), coefficients.imag.unsqueeze(-1)
    p_re, p_im = c_re * coarse_re - c_im * coarse_im, c_re * coarse_im + c_im * coarse_re
    left = torch.cat([p_re, -p_im], dim=1).transpose(1, 2)  # (C, L/S, 2n): Re(pq) = p.re q.re - p.im q.im
    right = torch.cat([fine_re, fine_im], dim=1)  # (C, 2n, S)
    return 2 * torch.bmm(left, right).flatten(1)[:, :length]


def zoh_kernels(log_dt: Tensor, log_A_real: Tensor, A_imag: Tensor, C: Tensor, length: int) -> Tensor:
    """S4D kernels (channels, length): the state space model discretised by zero-order hold."""
    A = torch.complex(-torch.exp(log_A_real), A_imag)
    dtA = A * torch.exp(log_dt).unsqueeze(-1)
    zoh_input = (torch.exp(dtA) - 1) / A  # B_bar with B = 1 (B is folded into C)
    return vandermonde_kernel(torch.view_as_complex(C) * zoh_input, dtA, length)


class S4DKernel(nn.Module):
    """Per-channel S4D convolution kernels of any length, from continuous-time parameters.

    `state_size` N real state dimensions are N/2 complex modes (their conjugates are implied by
    taking 2 Re). Init as S4D-Lin: A = -1/2 + i*pi*n, dt log-uniform in [dt_min, dt_max], C ~ CN(0, 1).
    """

    # The state dynamics (A, dt): S4-family models train them at lr 1e-3 with no weight decay (the
    # trainer's `ssm_lr` group); weight decay would pull A toward 0, i.e. toward infinite memory.
    dynamics = ("log_dt", "log_A_real", "A_imag")

    def __init__(self, channels: int, state_size: int = 64, dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        if state_size < 2 or state_size % 2:
            raise DitkitError(f"S4D state_size must be an even number >= 2 (N/2 complex modes), got {state_size}")
        modes = state_size // 2
        log_dt = torch.rand(channels) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        self.log_A_real = nn.Parameter(torch.full((channels, modes), math.log(0.5)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(modes, dtype=torch.float32).repeat(channels, 1))
        self.C = nn.Parameter(torch.view_as_real(torch.randn(channels, modes, dtype=torch.complex64)))

    def forward(self, length: int) -> Tensor:
        """(channels, length) fp32 kernels."""
        return zoh_kernels(*(p.float() for p in (self.log_dt, self.log_A_real, self.A_imag, self.C)), length)

    def extra_repr(self) -> str:
        return f"channels={self.log_dt.shape[0]}, state_size={2 * self.A_imag.shape[1]}"


def two_sided_kernels(forward: Tensor, backward: Tensor) -> Tensor:
    """Causal kernels (C, L) and anti-causal ones (C, L) as rows of one circular kernel of length 2L.

    A backward row holds k[0] at 0 and k[m] at 2L - m, so a circular convolution of length 2L
    gives y[l] = sum_{j >= l} k[j - l] u[j]: the flipped scan without flipping any activations.
    """
    L = forward.shape[-1]
    causal = F.pad(forward, (0, L))
    anti_causal = torch.cat([backward[:, :1], backward.new_zeros(backward.shape[0], L), backward[:, 1:].flip(-1)], -1)
    return torch.cat([causal, anti_causal])


class FFTConv(torch.autograd.Function):
    """Circular convolution by real FFTs with a lean backward: it keeps the input and the kernel's
    spectrum, and its gradients are two real-FFT correlations (autograd's own backward goes
    through full-length complex transforms and needs about twice the memory)."""

    @staticmethod
    def forward(ctx, u: Tensor, kernel: Tensor) -> Tensor:
        n, L = kernel.shape[-1], u.shape[-1]
        kernel_spectrum = torch.fft.rfft(kernel, n=n)
        ctx.save_for_backward(u, kernel_spectrum)
        ctx.n = n
        return torch.fft.irfft(torch.fft.rfft(u, n=n) * kernel_spectrum, n=n)[..., :L]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        u, kernel_spectrum = ctx.saved_tensors
        n, L = ctx.n, u.shape[-1]
        grad_spectrum = torch.fft.rfft(grad, n=n)  # zero beyond L: outputs past L were cropped
        grad_u = grad_kernel = None
        if ctx.needs_input_grad[0]:
            grad_u = torch.fft.irfft(grad_spectrum * kernel_spectrum.conj(), n=n)[..., :L]
        if ctx.needs_input_grad[1]:
            cross = grad_spectrum * torch.fft.rfft(u, n=n).conj()
            grad_kernel = torch.fft.irfft(cross.reshape(-1, *cross.shape[-2:]).sum(0), n=n)
        return grad_u, grad_kernel


def fft_conv(u: Tensor, kernel: Tensor) -> Tensor:
    """y[..., l] = sum_j kernel[..., (l - j) mod n] u[..., j] for u (..., C, L), kernel (C, n), n >= 2L."""
    return FFTConv.apply(u, kernel)


class BidirectionalS4D(nn.Module):
    """S4D over (B, L, 2C): channels [:C] scan forward, channels [C:] backward, each with its own
    kernel, plus a per-channel skip D. Kernels are computed for the input's length in every call
    (nothing is cached across calls or layers); kernel and FFTs run in fp32 outside autocast."""

    def __init__(self, channels: int, state_size: int = 64):
        super().__init__()
        self.channels = channels
        self.kernel = S4DKernel(2 * channels, state_size)
        self.D = nn.Parameter(torch.randn(2 * channels))

    def forward(self, u: Tensor) -> Tensor:
        L = u.shape[1]
        with full_precision(u.device):
            k = self.kernel(L)
            kernels = two_sided_kernels(k[:self.channels], k[self.channels:])
            signal = u.float().transpose(1, 2)  # (B, 2C, L): FFT along the last, contiguous dim
            y = fft_conv(signal, kernels) + self.D.float().unsqueeze(-1) * signal
        return y.transpose(1, 2).to(u.dtype)


class OffsetLinear(nn.Module):
    """One linear map per offset k of M: (..., M, in) -> (..., M, out), weight (M, out, in)."""

    def __init__(self, offsets: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(offsets, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(offsets, out_features))
        for w in self.weight:
            nn.init.xavier_uniform_(w)

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("...mi,moi->...mo", x, self.weight) + self.bias


@register_mixer("ssm")
class GatedSSM(TokenMixer):
    """DiffuSSM's gated bidirectional S4D mixer, with an hourglass of factor `hourglass` (M):
    dense layers at the token count, the SSM at M times it. `num_heads` is unused."""

    def __init__(self, dim: int, num_heads: int, state_size: int = 64, hourglass: int = 1):
        super().__init__(dim, num_heads)
        if hourglass < 1 or (2 * dim) % hourglass:
            raise DitkitError(f"ssm hourglass factor must be >= 1 and divide 2 x width {2 * dim}, got {hourglass}")
        self.hourglass = hourglass
        self.act = nn.GELU(approximate="tanh")
        self.project_in = nn.Linear(dim, dim)                       # W0
        self.expand = nn.Linear(dim, hourglass * 2 * dim)           # W_up_k for k < M, stacked
        self.ssm = BidirectionalS4D(dim, state_size)
        self.contract = OffsetLinear(hourglass, 2 * dim, 2 * dim // hourglass)  # W_down_k
        self.merge = nn.Linear(2 * dim, dim)                        # W2
        self.gate = nn.Linear(dim, dim)                             # W1
        self.project_out = nn.Linear(dim, dim)                      # W3

    def forward(self, x: Tensor, grid: Grid, num_global: int = 0) -> Tensor:
        B, N, D = x.shape
        self.check_tokens(N, grid, num_global)
        M = self.hourglass
        u = self.act(self.expand(self.act(self.project_in(x))))   # (B, N, M * 2D)
        y = self.ssm(u.reshape(B, N * M, 2 * D))                   # position j*M + k: offset k of token j
        short = self.act(self.contract(y.reshape(B, N, M, 2 * D))).reshape(B, N, 2 * D)
        return self.project_out(self.act(self.merge(short)) * self.act(self.gate(x)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hourglass={self.hourglass}"
