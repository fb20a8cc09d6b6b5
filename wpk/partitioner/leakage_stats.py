"""How much of the input a tensor gives away, from n x n Gram matrices only.

Two figures, each computed from the samples' Gram matrix G = Z Z^T of a tensor Z (one row per
calibration sample), so that a tensor's size never enters the memory beyond one pass:

- distance correlation (Székely & Rizzo 2014, the unbiased U-centred estimator of dCor^2)
  between the input and the tensor, with a bootstrap percentile band;
- a reconstruction attack: kernel ridge regression with a linear kernel (the dual form of a
  linear decoder from the tensor back to the input), fitted on one half of the samples with the
  ridge chosen by leave-one-out, scored on the other half by PSNR and SSIM (Wang et al. 2004).
"""
from __future__ import annotations

import numpy as np

ALPHAS = tuple(10.0 ** np.arange(-10, 3))   # ridge / largest eigenvalue, chosen by LOO


# -- distance correlation ---------------------------------------------------------------------
def distances(gram: np.ndarray) -> np.ndarray:
    """Euclidean distances between samples: |z_i - z_j|^2 = G_ii + G_jj - 2 G_ij."""
    diag = np.diag(gram)
    return np.sqrt(np.maximum(diag[:, None] + diag[None, :] - 2.0 * gram, 0.0))


def u_centred(a: np.ndarray) -> np.ndarray:
    """The U-centred distance matrix (zero diagonal), which makes dCov^2 unbiased."""
    n = a.shape[0]
    rows = a.sum(axis=1)
    out = a - rows[:, None] / (n - 2) - rows[None, :] / (n - 2) + a.sum() / ((n - 1) * (n - 2))
    np.fill_diagonal(out, 0.0)
    return out


def dcor2_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    """Bias-corrected dCor^2 from two distance matrices (may dip below 0 when independent)."""
    n = a.shape[0]
    if n < 4:
        raise ValueError("distance correlation needs at least 4 samples")
    ua, ub = u_centred(a), u_centred(b)
    xy, xx, yy = (float((p * q).sum()) / (n * (n - 3)) for p, q in ((ua, ub), (ua, ua), (ub, ub)))
    if xx <= 0 or yy <= 0:
        return 0.0          # a constant: nothing in it depends on the input
    return xy / np.sqrt(xx * yy)


def dcor(a: np.ndarray, b: np.ndarray) -> float:
    """dCor in [0, 1]: the square root of the unbiased dCor^2, negatives read as 0."""
    return float(np.sqrt(min(max(dcor2_unbiased(a, b), 0.0), 1.0)))


def dcor_band(a: np.ndarray, b: np.ndarray, reps: int = 100, level: float = 0.95,
              seed: int = 0) -> tuple[float, float]:
    """Bootstrap percentile band of dCor. Each replicate keeps the distinct samples of a draw
    with replacement (about 63% of them): a repeated sample would be a pair at distance 0 in
    both matrices, which fakes dependence. Fewer samples per replicate widen the band, so it
    errs on the wide side."""
    rng = np.random.default_rng(seed)
    n = a.shape[0]
    values = []
    for _ in range(reps):
        idx = np.unique(rng.integers(0, n, n))
        if len(idx) >= 4:
            values.append(dcor(a[np.ix_(idx, idx)], b[np.ix_(idx, idx)]))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


# -- reconstruction attack --------------------------------------------------------------------
def _kernel_blocks(gram: np.ndarray, train: np.ndarray, test: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray] | None:
    """Train/train and test/train kernels of the features centred on the training mean and
    scaled to unit mean norm, plus a constant feature of that size (a nearly free intercept
    that keeps the kernel full rank along the constant direction, so leave-one-out stays
    exact). None when the features do not vary: nothing to decode."""
    k = gram[np.ix_(train, train)]
    ks = gram[np.ix_(test, train)]
    col = k.mean(axis=0)
    total = k.mean()
    k = k - k.mean(axis=1)[:, None] - col[None, :] + total
    ks = ks - ks.mean(axis=1)[:, None] - col[None, :] + total
    scale = float(np.trace(k)) / len(train)
    if not scale > 1e-12 * max(float(np.abs(np.diag(gram)).max()), 1e-300):
        return None
    return k / scale + 1.0, ks / scale + 1.0


def _loo_error(s: np.ndarray, u: np.ndarray, proj_gram: np.ndarray, lam: float) -> float:
    """Leave-one-out squared error of kernel ridge at `lam`: residual_i = c_i / M_ii with
    c = (K + lam I)^-1 y and M = (K + lam I)^-1 (stable even where the fit interpolates).
    |c_i|^2 comes from proj_gram = (U^T y)(U^T y)^T, so each ridge costs O(m^3), not O(m^2 d)."""
    inverse = 1.0 / (s + lam)
    scaled = u * inverse[None, :]
    coef_norms = np.einsum("ij,jk,ik->i", scaled, proj_gram, scaled)
    m_diag = np.einsum("ij,j,ij->i", u, inverse, u)
    return float(np.mean(coef_norms / m_diag ** 2))


def ridge_reconstruct(gram: np.ndarray, targets: np.ndarray, train: np.ndarray,
                      test: np.ndarray) -> np.ndarray:
    """The test rows of `targets` as a linear decoder fitted on the train rows predicts them
    from the tensor (dual form: only the Gram matrix of the tensor is needed)."""
    blocks = _kernel_blocks(gram.astype(np.float64), train, test)
    y = targets[train].astype(np.float64)
    mean = y.mean(axis=0)
    if blocks is None:
        return np.repeat(mean[None, :], len(test), axis=0)
    k, ks = blocks
    y = y - mean
    s, u = np.linalg.eigh((k + k.T) / 2)
    s = np.maximum(s, 0.0)
    scale = float(s.max()) or 1.0
    proj = u.T @ y
    proj_gram = proj @ proj.T
    lam = min((a * scale for a in ALPHAS), key=lambda lam: _loo_error(s, u, proj_gram, lam))
    return ((ks @ u) / (s + lam)[None, :]) @ proj + mean


def psnr(truth: np.ndarray, estimate: np.ndarray, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB over all test samples (inf when exact)."""
    mse = float(np.mean((truth.astype(np.float64) - estimate) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def _gaussian(size: int, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    w = np.exp(-x ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def _filter(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering over the last two axes."""
    view = np.lib.stride_tricks.sliding_window_view
    return view(view(img, len(w), axis=-1) @ w, len(w), axis=-2) @ w


def ssim_images(truth: np.ndarray, estimate: np.ndarray, data_range: float) -> float:
    """Mean SSIM of [n, C, H, W] images, 11x11 Gaussian window (sigma 1.5), per channel."""
    size = min(11, truth.shape[-1], truth.shape[-2])
    size -= 1 - size % 2
    w = _gaussian(size)
    x, y = truth.astype(np.float64), estimate.astype(np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _filter(x, w), _filter(y, w)
    sxx = _filter(x * x, w) - mx * mx
    syy = _filter(y * y, w) - my * my
    sxy = _filter(x * y, w) - mx * my
    ssim = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return float(ssim.mean())


def ssim_vectors(truth: np.ndarray, estimate: np.ndarray, data_range: float) -> float:
    """Mean SSIM of [n, d] vectors, one uniform window over each whole vector."""
    x, y = truth.astype(np.float64), estimate.astype(np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = x.mean(axis=1), y.mean(axis=1)
    sxy = ((x - mx[:, None]) * (y - my[:, None])).mean(axis=1)
    ssim = ((2 * mx * my + c1) * (2 * sxy + c2)) / (
        (mx ** 2 + my ** 2 + c1) * (x.var(axis=1) + y.var(axis=1) + c2))
    return float(ssim.mean())
