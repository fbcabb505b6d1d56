"""Distribution metrics over image features: Frechet distance, KID, diversity.

Features come from any fixed network: the shapes-v1 evaluator for shapes-v1 (the MNIST-FID
convention: a small in-domain classifier, not Inception), FID Inception-v3 (eval/inception.py)
for photographs. Everything here is float64 numpy on the host.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def _features(x, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name}: expected features [N, D], got shape {x.shape}")
  if not np.isfinite(x).all():
    raise ValueError(f"{name}: features contain NaN or inf")
  return x


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (unbiased, as FID implementations use) of [N, D] features."""
  x = _features(features, "features")
  if x.shape[0] < 2:
    raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
  return x.mean(0), np.cov(x, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((matrix + matrix.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

  Tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
  PSD matrix S1^(1/2) S2 S1^(1/2) (same spectrum as S1 S2), which avoids the complex
  round-off of a general matrix square root on near-singular covariances.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f"mismatched statistics: means {mu1.shape} / {mu2.shape}, covariances "
                     f"{s1.shape} / {s2.shape}")
  root1 = _sqrt_psd(s1)
  middle = root1 @ s2 @ root1
  eig = np.linalg.eigvalsh((middle + middle.T) / 2)
  trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def frechet_distance_features(features1, features2) -> float:
  """The Frechet distance between the Gaussians fitted to two feature sets [N1, D], [N2, D].

  With fewer samples than dimensions (e.g. FID's 2048 Inception features of a few hundred
  images) it works in sample space, exactly: with A, B the centred features scaled by
  1 / sqrt(N - 1), S1 = A^T A and S2 = B^T B, so Tr((S1 S2)^(1/2)) is the sum of the singular
  values of A B^T [N1, N2], and Tr(S) is ||A||_F^2. That is a product and a small SVD instead
  of two D x D eigendecompositions (0.03 s against 5 s for 200 x 150 images of 2048 features
  on 2 CPU cores).
  """
  x, y = _features(features1, "features1"), _features(features2, "features2")
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"feature widths differ: {x.shape[1]} vs {y.shape[1]}")
  if min(x.shape[0], y.shape[0]) < 2:
    raise ValueError("need at least 2 feature vectors on each side for a covariance")
  if max(x.shape[0], y.shape[0]) > x.shape[1]:
    return frechet_distance(*feature_statistics(x), *feature_statistics(y))
  mu1, mu2 = x.mean(0), y.mean(0)
  a = (x - mu1) / np.sqrt(x.shape[0] - 1)
  b = (y - mu2) / np.sqrt(y.shape[0] - 1)
  trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
  diff = mu1 - mu2
  return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2 * trace_sqrt)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  d = x.shape[1]
  kxx = (x @ x.T / d + 1) ** 3
  kyy = (y @ y.T / d + 1) ** 3
  kxy = (x @ y.T / d + 1) ** 3
  m, n = x.shape[0], y.shape[0]
  return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
               + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())


def kernel_distance(features1, features2, *, num_subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
  """KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / D + 1)^3, averaged over random subsets; returns (mean, std).

  Unbiased, so unlike the Frechet distance it has no small-sample offset: identical
  distributions give ~0 (possibly slightly negative) at any sample size.
  """
  x, y = _features(features1, "features1"), _features(features2, "features2")
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"feature widths differ: {x.shape[1]} vs {y.shape[1]}")
  size = min(subset_size, x.shape[0], y.shape[0])
  if size < 2:
    raise ValueError("need at least 2 feature vectors on each side")
  rng = np.random.default_rng(seed)
  values = [_mmd2_unbiased(x[rng.choice(x.shape[0], size, replace=False)],
                           y[rng.choice(y.shape[0], size, replace=False)])
            for _ in range(num_subsets)]
  return float(np.mean(values)), float(np.std(values))


def diversity(features, groups: Sequence[Hashable]) -> float:
  """Mean pairwise L2 distance between the features of samples of the same prompt, averaged
  over prompts with at least two samples (0 = every prompt gives identical images)."""
  x = _features(features, "features")
  groups = list(groups)
  if len(groups) != x.shape[0]:
    raise ValueError(f"{x.shape[0]} feature vectors but {len(groups)} group labels")
  per_group = []
  for g in dict.fromkeys(groups):
    rows = x[[i for i, h in enumerate(groups) if h == g]]
    if rows.shape[0] < 2:
      continue
    dist = np.sqrt(np.maximum(((rows[:, None] - rows[None]) ** 2).sum(-1), 0))
    k = rows.shape[0]
    per_group.append(dist.sum() / (k * (k - 1)))
  if not per_group:
    raise ValueError("diversity needs at least one prompt with two or more samples")
  return float(np.mean(per_group))
