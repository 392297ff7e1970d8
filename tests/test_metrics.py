import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from gradleak.metrics import pair_by_mse, psnr, score, ssim


def _pair(seed, size, noise):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(1, 1, size, size, generator=g)
    b = (a + noise * torch.randn(1, 1, size, size, generator=g)).clamp(0, 1)
    return a, b


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), size=st.integers(11, 48), noise=st.floats(0.0, 0.5))
def test_ssim_agrees_with_skimage(seed, size, noise):
    a, b = _pair(seed, size, noise)
    ref = structural_similarity(a[0, 0].numpy().astype(np.float64), b[0, 0].numpy().astype(np.float64),
                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)
    assert abs(float(ssim(a, b)[0]) - ref) < 1e-4


def test_ssim_on_real_structure_and_multichannel():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 40), indexing="ij")
    a = torch.stack([torch.sin(6 * xx) * 0.5 + 0.5, yy, xx * yy])[None]
    b = (a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    ref = structural_similarity(a[0].numpy().astype(np.float64), b[0].numpy().astype(np.float64),
                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1,
                                channel_axis=0)
    assert abs(float(ssim(a, b)[0]) - ref) < 1e-4
    assert float(ssim(a, a)[0]) == pytest.approx(1.0, abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), noise=st.floats(0.001, 0.5))
def test_psnr_agrees_with_skimage(seed, noise):
    a, b = _pair(seed, 16, noise)
    if torch.equal(a, b):
        return
    ref = peak_signal_noise_ratio(a.numpy().astype(np.float64), b.numpy().astype(np.float64), data_range=1)
    assert abs(float(psnr(a, b)[0]) - ref) < 1e-3


def test_psnr_known_value_and_cap():
    a = torch.zeros(1, 1, 8, 8)
    b = torch.full((1, 1, 8, 8), 0.1)
    assert float(psnr(a, b)[0]) == pytest.approx(20.0, abs=1e-4)
    assert float(psnr(a, a)[0]) == 100.0


def test_hungarian_pairing_recovers_a_shuffle():
    g = torch.Generator().manual_seed(0)
    originals = torch.rand(5, 1, 16, 16, generator=g)
    order = [3, 0, 4, 1, 2]
    recs = originals[order] + 0.01 * torch.randn(5, 1, 16, 16, generator=g)
    perm = pair_by_mse(originals, recs)
    assert [order[p] for p in perm] == [0, 1, 2, 3, 4]


def test_pairing_beats_greedy_when_greedy_is_wrong():
    # original 0 is closest to rec 0, but giving rec 0 to original 1 is globally better
    o = torch.tensor([0.0, 0.3]).view(2, 1, 1, 1).expand(2, 1, 4, 4).clone()
    r = torch.tensor([0.2, -0.2]).view(2, 1, 1, 1).expand(2, 1, 4, 4).clone()
    assert pair_by_mse(o, r) == [1, 0]


def test_score_pairs_before_scoring_and_counts_labels_as_a_multiset():
    g = torch.Generator().manual_seed(1)
    truth = torch.rand(3, 1, 16, 16, generator=g)
    rec = truth[[2, 0, 1]].clone()
    out = score(truth, torch.tensor([0, 1, 1]), rec, torch.tensor([1, 0, 0]))
    assert out["psnr"] == 100.0 and out["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert [p["paired_reconstruction"] for p in out["per_image"]] == [1, 2, 0]
    assert out["label_accuracy"] == pytest.approx(2 / 3)
    assert "Gaussian" in out["metric_variants"]["ssim"]
