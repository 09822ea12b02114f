import math

import pytest
import torch

from ditkit import DitkitError, build_mixer, build_model, model_config
from ditkit.metrics import count_flops
from ditkit.metrics.memory import peak_memory
from ditkit.mixers.ssm import BidirectionalS4D, fft_conv, two_sided_kernels, vandermonde_kernel


def s4d(channels=3, state_size=8):
    layer = BidirectionalS4D(channels, state_size)
    with torch.no_grad():  # steps large enough that the state decays visibly over the sequence
        layer.kernel.log_dt.uniform_(math.log(0.05), math.log(0.5))
    return layer


def recurrence(layer: BidirectionalS4D, u: torch.Tensor) -> torch.Tensor:
    """x_k = Abar x_{k-1} + Bbar u_k, y_k = 2 Re(C x_k) + D u_k, in float64; backward channels
    run the same recurrence from the last position to the first."""
    k = layer.kernel
    A = torch.complex(-torch.exp(k.log_A_real.double()), k.A_imag.double())
    dt = torch.exp(k.log_dt.double()).unsqueeze(-1)
    A_bar, B_bar = torch.exp(A * dt), (torch.exp(A * dt) - 1) / A
    C = torch.view_as_complex(k.C.detach().double().contiguous())
    u = u.double()
    B, L, channels = u.shape
    y = torch.zeros(B, L, channels, dtype=torch.float64)
    order = {True: range(L), False: range(L - 1, -1, -1)}
    for c in range(channels):
        state = torch.zeros(B, A.shape[1], dtype=torch.complex128)
        for step in order[c < layer.channels]:
            state = A_bar[c] * state + B_bar[c] * u[:, step, c:c + 1]
            y[:, step, c] = 2 * (state * C[c]).sum(-1).real + layer.D[c].double() * u[:, step, c]
    return y


def test_fft_convolution_equals_the_explicit_recurrence():
    layer = s4d()
    u = torch.randn(2, 37, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(u).double(), recurrence(layer, u), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("length", [1, 2, 50, 1000])
def test_blocked_vandermonde_kernel_equals_the_direct_sum(length):
    dtA = torch.complex(-torch.rand(4, 6) * 0.02, torch.rand(4, 6) * 3)
    coefficients = torch.randn(4, 6, dtype=torch.complex64)
    steps = torch.arange(length, dtype=torch.float64)
    direct = 2 * (coefficients.cdouble().unsqueeze(-1) * torch.exp(dtA.cdouble().unsqueeze(-1) * steps)).sum(1).real
    torch.testing.assert_close(vandermonde_kernel(coefficients, dtA, length).double(), direct, atol=1e-4, rtol=1e-4)


def test_forward_channels_are_causal_backward_channels_see_the_future():
    layer = s4d()
    u = torch.randn(1, 20, 6)
    v = u.clone()
    v[0, 12] += 1.0
    with torch.no_grad():
        changed = (layer(v) - layer(u)).abs() > 1e-6
    assert not changed[0, :12, :3].any() and changed[0, 12:, :3].all()  # forward: only from 12 on
    assert changed[0, :13, 3:].all() and not changed[0, 13:, 3:].any()  # backward: only up to 12


@pytest.mark.parametrize("n", [14, 15])
def test_fft_conv_gradients(n):
    u = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fft_conv, (u, kernel))


def test_two_sided_kernels_place_the_backward_kernel_before_zero():
    forward, backward = torch.arange(1.0, 4.0)[None], torch.arange(10.0, 13.0)[None]
    assert two_sided_kernels(forward, backward).tolist() == [[1, 2, 3, 0, 0, 0], [10, 0, 0, 0, 12, 11]]


def test_kernel_memory_stays_small_and_does_not_grow_with_depth():
    """The (channels, N/2, L) Vandermonde matrix (16 MiB per layer here) is never built, and each
    layer computes its kernels inside forward: what a layer keeps for backward is O(channels x L)."""
    L = 2048

    def run(depth):
        layers = torch.nn.ModuleList(BidirectionalS4D(8, 128) for _ in range(depth))
        u = torch.randn(1, L, 16, requires_grad=True)

        def step():
            x = u
            for layer in layers:
                x = layer(x)
            x.sum().backward()

        return peak_memory(step)

    one, two = run(1), run(2)
    vandermonde = 16 * 64 * L * 2 * 4
    assert one < vandermonde / 2
    assert two - one < vandermonde / 4  # one more layer (measured: 3.6 MiB)


def test_fft_flops_are_counted():
    u = torch.randn(2, 8, 16)
    flops = count_flops(lambda: torch.fft.irfft(torch.fft.rfft(u, n=32), n=32))
    assert flops == 2 * (2 * 8 * 2.5 * 32 * math.log2(32))  # rfft and irfft of 16 rows of length 32


def test_mixer_mixes_both_ways_keeps_shapes_and_takes_global_tokens():
    mixer = build_mixer("ssm", dim=16, num_heads=2, state_size=8, hourglass=2)
    x = torch.randn(2, 1 + 15, 16)  # one global token, a 3x5 grid (odd: the hourglass is per token)
    assert mixer(x, (3, 5), num_global=1).shape == x.shape
    y = x.clone()
    y[:, -1] += 1.0  # the last image token reaches the global token through the backward scan
    with torch.no_grad():
        assert (mixer(y, (3, 5), 1)[:, 0] - mixer(x, (3, 5), 1)[:, 0]).abs().max() > 1e-5


def test_mixer_in_dit_and_under_autocast():
    model = build_model(model_config("DiT-Nano/2", mixer="ssm", depth=1, hidden_size=32, num_heads=2,
                                     mixer_options={"state_size": 16}))
    x, t, y = torch.randn(1, 4, 6, 10), torch.zeros(1), torch.zeros(1, dtype=torch.long)
    assert model(x, t, y).shape == (1, 8, 6, 10)
    mixer = build_mixer("ssm", dim=16, num_heads=1)
    tokens = torch.randn(1, 12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = mixer(tokens, (3, 4))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), mixer(tokens, (3, 4)), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("options,message", [({"hourglass": 3}, "divide 2 x width 16"),
                                             ({"state_size": 7}, "even number")])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(DitkitError, match=message):
        build_mixer("ssm", dim=8, num_heads=1, **options)
