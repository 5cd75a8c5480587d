"""The sampler-or-regressor measures tell apart, on the phantom's known truth, a true conditional
sample (a same-mask truth draw), a copy of the real case, the conditional mean, and noise."""

import numpy as np
import pytest

from diffusion_glioma.data.phantom import GLIOBLASTOMA, MODALITIES, make_subject
from diffusion_glioma.evaluation.conditional import correlation_with_real, spread_ratio, two_draw_ratio


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
