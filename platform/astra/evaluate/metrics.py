"""Frame metrics: PSNR and SSIM of uint8 frames, and the nearest-ground-truth decision.

SSIM is the standard one (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) on
the luma channel, written out here in a few lines of torch because no dependency of the project
ships it (scikit-image would be a large one for one function).
"""

from __future__ import annotations

import numpy as np
import torch


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 frame stacks, over all their pixels."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))


def _luma(frames: np.ndarray) -> torch.Tensor:
    f = torch.from_numpy(frames.astype(np.float64))
    return (0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2])[:, None]  # (N, 1, H, W)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 frame stacks (N, H, W, 3), on luma, valid windows only."""
    x, y = _luma(a), _luma(b)
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = (g / g.sum())[:, None] * (g / g.sum())[None, :]
    w = g[None, None]
    size = min(x.shape[-2:])
    if size < 11:  # frames smaller than the window: one global window
        w = torch.full((1, 1, size, size), 1.0 / size**2, dtype=torch.float64)

    def blur(t):
        return torch.nn.functional.conv2d(t, w)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def nearest(generated: np.ndarray, truths: list[np.ndarray]) -> tuple[int, list[float]]:
    """(index of the ground truth nearest to ``generated`` by pixel MSE, every MSE); frame 0 (the
    shared start) is left out."""
    g = generated[1:].astype(np.float64)
    dists = [float(np.mean((g - t[1:].astype(np.float64)) ** 2)) for t in truths]
    return int(np.argmin(dists)), dists
