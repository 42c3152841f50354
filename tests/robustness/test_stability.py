"""Perturbation stability (ImageNet-P): the measures against a transcription of the published evaluation loops,
the sequences against OpenCV / SciPy resampling, and end-to-end on constant and alternating models."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
import torch
from torch import nn

from robustlens.analysis.robustness import stability as st
from robustlens.analysis.robustness._common import RobustnessInputError

# -- the published evaluation (ImageNet-P/cifar-p-eval.py), transcribed loop by loop as the reference ------------


def reference_flip_prob(predictions, noise, difficulty):
    result = 0.0
    step = 1 if noise else difficulty
    for vid in predictions:
        per_vid = []
        for i in range(step):
            prev = vid[i]
            for pred in vid[i::step][1:]:
                per_vid.append(int(prev != pred))
                if not noise:
                    prev = pred
        result += np.mean(per_vid) / len(predictions)
    return result


def reference_top5(scores, noise, difficulty):
    from scipy.stats import rankdata

    k = scores.shape[-1]
    cum = np.cumsum(np.asarray([0] + [1] * 5 + [0] * (k - 1 - 5)))

    def dist(sigma):
        return np.sum(np.abs(cum[:5] - cum[sigma - 1][:5]))

    result = 0.0
    step = 1 if noise else difficulty
    for vid in scores:
        ranks = [rankdata(-frame, method="ordinal") for frame in vid]
        per_vid = []
        for i in range(step):
            perm1 = ranks[i]
            inv = np.argsort(perm1)
            for perm2 in ranks[i::step][1:]:
                per_vid.append(dist(perm2[inv]))
                if not noise:
                    perm1 = perm2
                    inv = np.argsort(perm1)
        result += np.mean(per_vid) / len(scores)
    return result


@pytest.mark.parametrize("noise", [True, False])
@pytest.mark.parametrize("difficulty", [1, 2, 5])
def test_measures_equal_the_published_loops(noise, difficulty):
    rng = np.random.default_rng(difficulty)
    scores = rng.normal(size=(12, 31, 10))
    scores[:, 1::3] = scores[:, 0:1]  # some frames repeat the first: partial stability
    preds = scores.argmax(-1)
    fp = st.flip_probability(preds, noise=noise, difficulty=difficulty)
    t5 = st.top5_distance(scores, noise=noise, difficulty=difficulty)
    assert fp.mean() == pytest.approx(reference_flip_prob(preds, noise, difficulty if not noise else 1))
    assert t5.mean() == pytest.approx(reference_top5(scores, noise, difficulty if not noise else 1))


def test_constant_and_alternating_predictions():
    constant = np.zeros((4, 31), dtype=int)
    alternating = np.tile(np.arange(31) % 2, (4, 1))
    assert st.flip_probability(constant, noise=False).tolist() == [0.0] * 4
    assert st.flip_probability(constant, noise=True).tolist() == [0.0] * 4
    assert st.flip_probability(alternating, noise=False).tolist() == [1.0] * 4
    # noise frames are compared with frame 0: frames 1, 3, …, 29 differ (15 of 30)
    assert st.flip_probability(alternating, noise=True).tolist() == [0.5] * 4
    # difficulty 2 compares j with j-2: alternating by one frame never flips at distance 2
    assert st.flip_probability(alternating, noise=False, difficulty=2).tolist() == [0.0] * 4


def test_top5_distance_known_swaps():
    base = np.arange(10, 0, -1, dtype=float)  # class 0 ranked first, …, class 9 last
    swap12 = base.copy()
    swap12[[0, 1]] = swap12[[1, 0]]  # ranks 1 and 2 exchanged
    out_of_top = base.copy()
    out_of_top[[0, 9]] = out_of_top[[9, 0]]  # the leader falls to rank 10
    seq = np.stack([base, base, swap12, out_of_top])[None]
    # comparisons (d = 1): base→base 0; base→swap12: |0-1| + |1-0| = 2; swap12→out_of_top: swap12's leaders
    # (1, 0, 2, 3, 4) have ranks (2, 10, 3, 4, 5) there: |0-1| + |1-min(9, 5)| = 5
    assert st.top5_distance(seq, noise=False).tolist() == [pytest.approx((0 + 2 + 5) / 3)]


def test_bad_inputs_are_named():
    with pytest.raises(RobustnessInputError, match="difficulty"):
        st.flip_probability(np.zeros((2, 5), int), noise=False, difficulty=0)
    with pytest.raises(RobustnessInputError, match=r"\(N, T\)"):
        st.flip_probability(np.zeros(5, int), noise=False)
    with pytest.raises(RobustnessInputError, match="unknown perturbation"):
        st.perturbation_sequence(torch.rand(1, 1, 8, 8), "fog")


# -- sequences against independent resampling -------------------------------------------------------------------


def test_geometric_frames_match_opencv():
    rng = np.random.default_rng(0)
    img = rng.random((1, 1, 16, 16)).astype(np.float32)
    x = torch.from_numpy(img)
    h = w = 16
    for name, make in (
        ("tilt", lambda i: st._tilt(h, w, 0.75 * (i - 15))),
        ("rotate", lambda i: st._centered(h, w, st._rotation(i - 15))),
        ("scale", lambda i: st._centered(h, w, np.eye(2) * ((i * 2 + 70) / 100))),
    ):
        frames = st.perturbation_sequence(x, name)[0, :, 0].numpy()
        for i in (0, 7, 30):
            dst_to_src = make(i)
            ref = cv2.warpPerspective(
                img[0, 0],
                np.linalg.inv(dst_to_src),
                (w, h),
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=0,
            )
            # OpenCV's bilinear weights are fixed-point (1/32 steps): compare to that precision
            assert np.abs(frames[i] - ref).max() < 0.04, (name, i)


def test_frames_are_exact_where_the_transform_is_known():
    x = torch.rand(3, 2, 12, 12, generator=torch.Generator().manual_seed(1))
    trans = st.perturbation_sequence(x, "translate")
    assert trans.shape == (3, 16, 2, 12, 12)
    shift = torch.zeros_like(x)
    shift[..., 3:] = x[..., :-3]  # frame 10: 3 px to the right, zero fill
    torch.testing.assert_close(trans[:, 10], shift, atol=1e-5, rtol=0)
    for name in ("rotate", "scale", "shear", "brightness"):
        torch.testing.assert_close(st.perturbation_sequence(x, name)[:, 15], x, atol=1e-5, rtol=0)
    rot = st._affine_frames(x, np.stack([st._centered(12, 12, st._rotation(90))]))[:, 0]
    torch.testing.assert_close(rot, torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)  # counter-clockwise
    blur = st.perturbation_sequence(x, "gaussian_blur")
    for i in (0, 30):
        ref = ndi.gaussian_filter(x[0, 1].double().numpy(), 0.3 + 0.015 * i, mode="nearest", truncate=7.0)
        np.testing.assert_allclose(blur[0, i, 1].numpy(), ref, atol=1e-5)
    gray = torch.full((1, 1, 4, 4), 0.5)
    assert st.perturbation_sequence(gray, "brightness")[0, 30].unique().tolist() == [pytest.approx(0.725)]
    rgb = torch.tensor([0.2, 0.4, 0.8]).reshape(1, 3, 1, 1)
    brighter = st.perturbation_sequence(rgb, "brightness")[0, 20].flatten()  # value 0.8 + 0.075, hue kept
    torch.testing.assert_close(brighter, torch.tensor([0.2, 0.4, 0.8]) * (0.875 / 0.8))
    for name in st.NOISE_PERTURBATIONS:
        frames = st.perturbation_sequence(x, name, random_state=3)
        assert frames.shape[1] == 31
        torch.testing.assert_close(frames[:, 0], x)  # frame 0 is the clean image
        assert not torch.equal(frames[:, 1], frames[:, 2])  # independent draws
        torch.testing.assert_close(frames, st.perturbation_sequence(x, name, random_state=3))  # seeded
    zoom = st.perturbation_sequence(x, "zoom_blur")
    torch.testing.assert_close(zoom[:, 0], x)
    assert float(zoom.min()) >= 0 and float(zoom.max()) <= 1


# -- end to end ------------------------------------------------------------------------------------------------


class Constant(nn.Module):
    def forward(self, x):
        return torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.2, 0.1]]).expand(x.shape[0], 6) + 0 * x.mean()


class Brightest(nn.Module):
    """Predicts class 1 when the mean pixel exceeds 0.5, else class 0."""

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([0.5 - m, m - 0.5], dim=1) * 100


def test_constant_model_is_perfectly_stable():
    x = torch.rand(5, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    res = st.perturbation_stability(Constant(), x, np.zeros(5, int), batch_size=2)
    assert res.summary["mean_flip_probability"] == 0.0
    assert res.summary["mean_top5_distance"] == 0.0
    assert set(res.per_sample.columns) >= {"fp_rotate", "t5d_rotate", "fp_mean", "sample", "label"}


def test_brightness_flips_are_found_per_sample_and_per_class():
    # sample 0 sits at the decision boundary (mean 0.5): brightness steps cross it once; sample 1 is far away
    x = torch.stack([torch.full((1, 6, 6), 0.5 - 0.005), torch.full((1, 6, 6), 0.1)])
    res = st.perturbation_stability(Brightest(), x, np.array([0, 1]), perturbations=("brightness",))
    fp = res.per_sample["fp_brightness"].to_numpy()
    assert fp[0] == pytest.approx(1 / 30) and fp[1] == 0.0
    grouped = res.grouped(res.per_sample["label"], "class")
    assert grouped.set_index("class").loc[0, "fp_brightness"] == pytest.approx(1 / 30)
    rates = st.perturbation_stability(
        Brightest(), x, np.array([0, 1]), perturbations=("brightness",), baseline={"brightness": 1 / 30}
    ).summary
    assert rates["mean_flip_rate"] == pytest.approx(0.5)


def test_mean_corruption_error_with_and_without_baseline():
    errors = pd.DataFrame({1: [0.1, 0.2], 2: [0.3, 0.4]}, index=["fog", "blur"])
    base = pd.DataFrame({1: [0.2, 0.2], 2: [0.6, 0.2]}, index=["fog", "blur"])
    plain = st.mean_corruption_error(errors)
    assert plain["baseline"].startswith("none") and plain["mce"] == pytest.approx((0.2 + 0.3) / 2)
    rel = st.mean_corruption_error(errors, base, clean_error=0.05, baseline_clean_error=0.1, baseline_name="v1")
    assert rel["ce"] == {"fog": pytest.approx(0.5), "blur": pytest.approx(1.5)}
    assert rel["mce"] == pytest.approx(1.0) and rel["baseline"] == "v1"
    assert rel["relative_ce"]["fog"] == pytest.approx((0.05 + 0.25) / (0.1 + 0.5))
    with pytest.raises(RobustnessInputError, match="baseline"):
        st.mean_corruption_error(errors, base.iloc[:1])
