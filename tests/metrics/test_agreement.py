import math

import pytest
import torch

from ditkit import DitkitError
from ditkit.metrics.agreement import agreement, psnr, ssim, to_unit_range


def test_psnr_matches_its_definition_for_a_known_error():
    a = torch.zeros(2, 3, 16, 16)  # ditkit range [-1, 1]: 0 is mid-grey, 0.5 on the [0, 1] scale
    b = a + 0.2  # +0.1 on the [0, 1] scale: MSE = 0.01, PSNR = 10 log10(1 / 0.01) = 20 dB
    assert torch.allclose(psnr(a, b), torch.full((2,), 20.0), atol=1e-4)


def test_value_ranges_agree_across_storage_formats():
    unit = torch.rand(2, 3, 16, 16)
    as_uint8 = (unit * 255).round().to(torch.uint8)
    other = torch.rand(2, 3, 16, 16)
    reference = psnr(unit, other, value_range=(0, 1))
    assert torch.allclose(psnr(unit * 2 - 1, other * 2 - 1), reference, atol=1e-4)  # default [-1, 1]
    assert torch.allclose(psnr(as_uint8, other, value_range=(0, 1)), reference, atol=0.05)
    assert to_unit_range(as_uint8).max() <= 1 and to_unit_range(unit * 2 - 1).min() >= 0


def test_ssim_is_one_for_identical_images_and_lower_against_noise():
    images = torch.linspace(-1, 1, 32).expand(2, 1, 32, 32).clone()
    assert torch.allclose(ssim(images, images), torch.ones(2), atol=1e-5)
    noisy = (images + 0.1 * torch.randn_like(images)).clamp(-1, 1)
    noise = torch.rand_like(images) * 2 - 1
    assert (ssim(images, noise) < ssim(images, noisy)).all() and (ssim(images, noisy) < 0.99).all()


def test_agreement_returns_means_and_per_image_values():
    a = torch.rand(3, 1, 8, 8) * 2 - 1  # 8x8: smaller than SSIM's 11 px window, which shrinks to fit
    b = a.clone()
    b[1] += 0.2
    result = agreement(a, b)
    assert result["psnr_per_image"][0] == math.inf and result["ssim_per_image"][0] == pytest.approx(1.0)
    assert result["psnr"] == pytest.approx(result["psnr_per_image"][1])  # identical pairs are left out of the mean
    assert len(result["ssim_per_image"]) == 3 and result["ssim"] < 1


def test_mismatched_shapes_name_the_fix():
    with pytest.raises(DitkitError, match="same size and count"):
        agreement(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 16))
