"""Frechet distance, KID, diversity against float64 references; the HTML report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg

from jaxt2i.eval import distribution, report
from jaxt2i.eval.shapes import Detection, judge


def _reference_fd(x, y):
  """The textbook formula with scipy's general matrix square root (as pytorch-fid does)."""
  mu1, mu2 = x.mean(0), y.mean(0)
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  covmean = covmean.real
  return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_reference():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
  b = rng.normal(loc=0.3, size=(400, 16)) @ rng.normal(size=(16, 16))
  ours = distribution.frechet_distance_features(a, b)
  ref = _reference_fd(a, b)
  assert ours == pytest.approx(ref, rel=1e-8)
  # Symmetric, ~0 on identical sets, growing with a shift.
  assert distribution.frechet_distance_features(b, a) == pytest.approx(ours, rel=1e-8)
  assert abs(distribution.frechet_distance_features(a, a)) < 1e-8
  shifts = [distribution.frechet_distance_features(a, a + s) for s in (0.1, 0.5, 1.0)]
  assert shifts == sorted(shifts) and shifts[0] > 0
  # A pure mean shift adds exactly ||shift||^2.
  assert shifts[2] == pytest.approx(16.0, rel=1e-6)


def test_frechet_distance_on_rank_deficient_covariances():
  """Fewer samples than dimensions: covariances are singular; the result stays finite, real."""
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(20, 64)), rng.normal(size=(20, 64)) + 0.5
  fd = distribution.frechet_distance_features(a, b)
  assert np.isfinite(fd) and fd > 0
  assert fd == pytest.approx(_reference_fd(a, b), rel=1e-5)


def test_frechet_distance_in_sample_space_equals_the_covariance_formula():
  """Fewer samples than dimensions takes the sample-space path (an SVD of the [N1, N2] cross
  product); it agrees with the D x D formula on the statistics, and with scipy."""
  rng = np.random.default_rng(3)
  mix = rng.normal(size=(256, 256)) / 16
  a = rng.normal(size=(40, 256)) @ mix
  b = rng.normal(loc=0.2, size=(70, 256)) @ mix
  fd = distribution.frechet_distance_features(a, b)
  stats = distribution.frechet_distance(*distribution.feature_statistics(a),
                                        *distribution.feature_statistics(b))
  assert fd == pytest.approx(stats, rel=1e-7)
  assert fd == pytest.approx(_reference_fd(a, b), rel=1e-5)
  assert distribution.frechet_distance_features(b, a) == pytest.approx(fd, rel=1e-10)
  assert abs(distribution.frechet_distance_features(a, a)) < 1e-9
  with pytest.raises(ValueError, match="feature widths differ: 256 vs 8"):
    distribution.frechet_distance_features(a, b[:, :8])
  with pytest.raises(ValueError, match="at least 2 feature vectors"):
    distribution.frechet_distance_features(a[:1], b)


def test_kid_matches_direct_formula_and_is_unbiased():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(60, 8)), rng.normal(loc=0.5, size=(50, 8))
  d = x.shape[1]

  def k(a, b):
    return (a @ b.T / d + 1) ** 3
  m, n = len(x), len(y)
  kxx, kyy = k(x, x), k(y, y)
  direct = (sum(kxx[i, j] for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
            + sum(kyy[i, j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
            - 2 * k(x, y).mean())
  mean, std = distribution.kernel_distance(x, y, num_subsets=1, subset_size=50)
  sub = distribution.kernel_distance(x[:50], y, num_subsets=3, subset_size=50)
  assert std == 0.0 and sub[1] < 1e-12  # subsets of the whole set: every draw is the same set
  x50_direct = distribution._mmd2_unbiased(x[:50], y)
  assert sub[0] == pytest.approx(x50_direct, rel=1e-12)
  assert distribution._mmd2_unbiased(x, y) == pytest.approx(direct, rel=1e-10)
  assert mean > 0
  # Two samples of one distribution: ~0 on average (it can be slightly negative).
  same = distribution.kernel_distance(rng.normal(size=(400, 8)), rng.normal(size=(400, 8)),
                                      num_subsets=20, subset_size=200)[0]
  assert abs(same) < 0.05 * mean


def test_diversity():
  rng = np.random.default_rng(3)
  same = np.repeat(rng.normal(size=(3, 5)), 4, axis=0)
  groups = np.repeat(np.arange(3), 4).tolist()
  assert distribution.diversity(same, groups) == 0.0
  spread = same + rng.normal(size=same.shape)
  wider = same + 3 * rng.normal(size=same.shape)
  assert 0 < distribution.diversity(spread, groups) < distribution.diversity(wider, groups)
  # Two points at distance 5 in one group, singleton groups are skipped.
  pts = np.array([[0.0, 0.0], [3.0, 4.0], [9.0, 9.0]])
  assert distribution.diversity(pts, ["a", "a", "b"]) == pytest.approx(5.0)
  with pytest.raises(ValueError, match="at least one prompt with two"):
    distribution.diversity(pts, ["a", "b", "c"])


def test_bad_features_are_named():
  with pytest.raises(ValueError, match="NaN"):
    distribution.feature_statistics(np.array([[0.0, np.nan], [1.0, 2.0]]))
  with pytest.raises(ValueError, match=r"expected features \[N, D\]"):
    distribution.kernel_distance(np.zeros(5), np.zeros((5, 2)))
  with pytest.raises(ValueError, match="mismatched statistics"):
    distribution.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_report_writes_json_html_and_pngs(tmp_path):
  caption = "a small red circle in the top left"
  good = judge(caption, [Detection("red", "circle", "small", 0.17, 0.17, 0.9)])
  bad = judge(caption, [Detection("red", "square", "small", 0.17, 0.17, 0.9)])
  images = np.zeros((2, 16, 16, 3), np.uint8)
  images[0, :4, :4] = (230, 30, 30)
  results = {"task": "demo", "splits": {"test": {"fully_correct": 0.5, "per_attribute": {
      "color": 1.0, "shape": 0.5, "size": 1.0, "place": 1.0, "count": 1.0},
      "frechet_distance": 1.25}}}
  page = report.write_report(tmp_path, results, [
      {"split": "test", "caption": caption, "images": images, "verdicts": [good, bad]},
      {"split": "test_heldout", "caption": "<b>not html</b>", "images": images[:1]}])
  html = page.read_text()
  assert json.loads((tmp_path / "eval.json").read_text()) == results
  assert caption in html and "&lt;b&gt;not html&lt;/b&gt;" in html
  assert html.count("<img ") == 3
  assert "S&#10007;" in html and "S&#10003;" in html  # the wrong shape is crossed
  assert "class='sample ok'" in html and "class='sample bad'" in html
  assert "1.25" in html and "fully_correct" in html
  from PIL import Image
  first = np.asarray(Image.open(tmp_path / "samples" / "0000_0.png"))
  np.testing.assert_array_equal(first, images[0])
  grid = np.asarray(Image.open(tmp_path / "grid_test.png"))  # one prompt, two samples: 1 x 2
  assert grid.shape == (16, 34, 3) and "grid_test.png" in html
