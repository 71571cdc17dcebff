import numpy as np
import pytest
import torch

from training.style.colour import histogram_matching, lab_statistics_transfer, lab_to_srgb, srgb_to_lab
from training.style.fourier import fourier_style_transfer
from training.style.transforms import STYLE_METHODS, apply_style


def _rand(*shape: int, low: float = 0.0, high: float = 1.0, seed: int = 0) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_lab_round_trip_is_within_1e_3():
    rgb = _rand(3, 3, 16, 16)
    assert (lab_to_srgb(srgb_to_lab(rgb)) - rgb).abs().max() < 1e-3


def test_lab_of_reference_colours():
    colours = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).view(3, 3, 1, 1)
    lab = srgb_to_lab(colours).view(3, 3)
    assert lab[0] == pytest.approx([100.0, 0.0, 0.0], abs=1e-2)  # D65 white
    assert lab[1] == pytest.approx([0.0, 0.0, 0.0], abs=1e-3)
    assert lab[2] == pytest.approx([53.24, 80.09, 67.20], abs=0.05)  # sRGB red


def test_lab_transfer_matches_target_mean_and_std_per_image():
    source = _rand(2, 3, 24, 24, low=0.35, high=0.6, seed=1)
    # Two differently cast targets, kept mid-range so no output colour is clipped at the gamut boundary.
    cast = torch.tensor([[1.0, 0.8, 0.7], [0.7, 0.8, 1.0]]).view(2, 3, 1, 1)
    target = _rand(2, 3, 24, 24, low=0.3, high=0.7, seed=2) * cast
    out_lab, target_lab = srgb_to_lab(lab_statistics_transfer(source, target)), srgb_to_lab(target)
    assert torch.allclose(out_lab.mean(dim=(-2, -1)), target_lab.mean(dim=(-2, -1)), atol=0.05)
    assert torch.allclose(out_lab.std(dim=(-2, -1)), target_lab.std(dim=(-2, -1)), atol=0.05)
    assert not torch.allclose(out_lab.mean(dim=(-2, -1)), srgb_to_lab(source).mean(dim=(-2, -1)), atol=1.0)


def test_lab_transfer_shares_a_single_target_across_the_batch():
    source, target = _rand(3, 3, 8, 8, low=0.4, high=0.6), _rand(1, 3, 12, 12, low=0.3, high=0.5, seed=3)
    out_lab = srgb_to_lab(lab_statistics_transfer(source, target)).mean(dim=(-2, -1))
    assert torch.allclose(out_lab, srgb_to_lab(target).mean(dim=(-2, -1)).expand(3, 3), atol=0.05)


def test_histogram_matching_gives_the_source_the_targets_sorted_values():
    source, target = _rand(2, 3, 8, 8, seed=4), _rand(2, 3, 8, 8, seed=5)  # continuous values: no ties
    out = histogram_matching(source, target)
    assert torch.equal(out.flatten(2).sort(-1).values, target.flatten(2).sort(-1).values)
    # Ranks are kept: the brightest source pixel gets the brightest target value.
    assert torch.equal(out.flatten(2).argsort(-1), source.flatten(2).argsort(-1))


def test_histogram_matching_interpolates_target_quantiles_when_sizes_differ():
    source, target = _rand(1, 3, 4, 4, seed=6), _rand(1, 3, 6, 6, seed=7)  # 16 source pixels, 36 target pixels
    out_sorted = histogram_matching(source, target).flatten(2).sort(-1).values[0]
    for channel in range(3):
        target_sorted = target[0, channel].flatten().sort().values.numpy()
        expected = np.interp(np.arange(16) * 35 / 15, np.arange(36), target_sorted)
        assert out_sorted[channel].numpy() == pytest.approx(expected, abs=1e-6)


def test_histogram_matching_keeps_tied_pixels_tied():
    source = (_rand(1, 3, 8, 8, seed=8) * 4).floor() / 4  # only 4 distinct values per channel
    out = histogram_matching(source, _rand(1, 3, 8, 8, seed=9))
    for channel in range(3):
        for value in source[0, channel].unique():
            assert out[0, channel][source[0, channel] == value].unique().numel() == 1
        order = source[0, channel].flatten().argsort()
        assert torch.all(out[0, channel].flatten()[order].diff() >= 0)  # monotone in the source value


def test_apply_style_dispatches_to_each_method():
    source, target = _rand(2, 3, 16, 16, seed=10), _rand(2, 3, 16, 16, seed=11)
    assert apply_style("none", source, None) is source
    assert torch.equal(apply_style("fda", source, target, beta=0.1), fourier_style_transfer(source, target, 0.1))
    assert torch.equal(apply_style("lab", source, target), lab_statistics_transfer(source, target))
    assert torch.equal(apply_style("histogram", source, target), histogram_matching(source, target))


def test_apply_style_rejects_unknown_methods_and_missing_targets():
    with pytest.raises(ValueError, match="none, fda, lab, histogram"):
        apply_style("cyclegan", _rand(1, 3, 4, 4), _rand(1, 3, 4, 4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs target images"):
        apply_style("lab", _rand(1, 3, 4, 4), None)
    assert STYLE_METHODS == ("none", "fda", "lab", "histogram")


def test_colour_transfers_reject_mismatched_batches():
    with pytest.raises(ValueError, match="target batch"):
        histogram_matching(_rand(3, 3, 4, 4), _rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        lab_statistics_transfer(_rand(1, 1, 4, 4), _rand(1, 3, 4, 4))
