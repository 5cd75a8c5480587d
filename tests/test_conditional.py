"""The sampler-or-regressor measures tell apart, on the phantom's known truth, a true conditional
sample (a same-mask truth draw), a copy of the real case, the conditional mean, and noise."""

import numpy as np
import pytest

from diffusion_glioma.data.phantom import GLIOBLASTOMA, MODALITIES, make_subject
from diffusion_glioma.evaluation.conditional import (coarse_spread_ratio, correlation_with_real, roughness_ratio,
                                                     spread_ratio, two_draw_ratio)


@pytest.fixture(scope="module")
def draws():
    """Nine subjects that share one mask: the real case (draw 0) and eight truth draws, at 6 mm."""
    subjects = [make_subject(GLIOBLASTOMA, 6.0, 21, draw=k) for k in range(9)]
    volumes = np.stack([np.stack([s["images"][m] for m in MODALITIES]) for s in subjects])
    return volumes, volumes[0, 0] > 0


def test_each_kind_of_generator_lands_where_it_should(draws):
    volumes, head = draws
    real, truth, other_truth = volumes[0], volumes[1:5], volumes[5:9]
    mean = truth.mean(axis=0)
    rng = np.random.default_rng(0)
    noise = np.stack([np.where(head, rng.normal(real[:, head].mean(), real[:, head].std(), real.shape), 0)
                      for _ in range(4)])
    sets = {"truth": truth, "copy": np.stack([real] * 4), "mean": np.stack([mean] * 4), "noise": noise}
    ratio = {name: two_draw_ratio(s[0], s[1], real, head) for name, s in sets.items()}
    spread = {name: spread_ratio(s, other_truth, head) for name, s in sets.items()}
    correlation = {name: correlation_with_real(s[0], real, head) for name, s in sets.items()}
    assert 0.6 < ratio["truth"] < 1.5 and 0.7 < spread["truth"] < 1.4  # a true sampler: about 1
    assert ratio["copy"] == 0 and ratio["mean"] == 0 and spread["copy"] == spread["mean"] == 0  # collapse
    assert spread["noise"] > 1.5 and correlation["noise"] < 0.1  # noise differs, but not like anatomy
    assert correlation["truth"] > 0.5 and correlation["mean"] > correlation["truth"]  # the mean is closest


def test_the_streaming_summary_of_a_mask_equals_the_measures_on_all_its_draws(draws):
    """`evaluate` sees a mask's draws one at a time (MaskGroup); its spread, two-draw ratio and
    correlation must be the ones computed on the whole stack, and the spread unbiased for few draws."""
    from diffusion_glioma.evaluation.conditional import MaskGroup, voxelwise_spread

    volumes, head = draws
    real, truth = volumes[0], volumes[1:6]
    group = MaskGroup(real, head)
    for draw in truth:
        group.add(draw)
    summary = group.summary()
    assert summary["draws"] == 5
    assert summary["spread"] == pytest.approx(voxelwise_spread(truth, head), rel=1e-6)
    assert summary["two_draw_ratio"] == pytest.approx(two_draw_ratio(truth[0], truth[1], real, head))
    assert summary["correlation_with_real"] == pytest.approx(np.mean([correlation_with_real(d, real, head)
                                                                      for d in truth]))
    # c4: the spread of 2 draws and of 8 draws of the same distribution agree on average (uncorrected,
    # 2 draws read about 20 % low).
    rng = np.random.default_rng(0)
    samples = rng.normal(0, 1, (8, 1, 4000, 1, 1))
    cube = np.ones((4000, 1, 1), bool)
    pairs = np.mean([voxelwise_spread(samples[i:i + 2], cube) for i in range(0, 8, 2)])
    assert pairs == pytest.approx(voxelwise_spread(samples, cube), rel=0.03)


def test_roughness_and_coarse_spread_tell_grain_from_varied_anatomy(draws):
    """A truth draw is as rough as the truth and varies at the anatomy's scale; the mean is smoother;
    the mean plus voxel noise of the truth's spread matches the truth's voxel spread but is grainier
    and varies far less once 2x2x2 blocks are averaged."""
    volumes, head = draws
    truth, other_truth = volumes[1:5], volumes[5:9]
    mean = truth.mean(axis=0)
    rng = np.random.default_rng(0)
    sd = truth[:, :, head].std(axis=0, ddof=1).mean()
    grain = np.stack([np.where(head, mean + rng.normal(0, sd, mean.shape), 0) for _ in range(4)])
    assert spread_ratio(grain, other_truth, head) > 0.8  # the voxel spread alone reads it as varied
    truth_roughness = [roughness_ratio(t, other_truth[0], head) for t in truth]
    assert 0.85 < min(truth_roughness) and max(truth_roughness) < 1.2  # 0.96-1.11 here
    assert roughness_ratio(mean, other_truth[0], head) < 0.8 * min(truth_roughness)  # 0.62: blur
    assert roughness_ratio(grain[0], other_truth[0], head) > 1.1 * max(truth_roughness)  # 1.29: grain
    # Block-averaged, the truth's variety stays (coarse / voxel spread ratio 1.09 here) and grain's falls (0.61).
    assert coarse_spread_ratio(truth, other_truth, head) > 0.9 * spread_ratio(truth, other_truth, head)
    assert coarse_spread_ratio(grain, other_truth, head) < 0.75 * spread_ratio(grain, other_truth, head)
