"""An independent float64 reference for temperature scaling, shared by the calibration tests."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

T_RTOL = 1e-4  # our temperatures match this reference to ~1e-5 relative


def reference_temperature(z: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = (1e-2, 1e2)) -> float:
    """Bounded Brent on the mean NLL over log T, in float64."""
    z = z.astype(np.float64)
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        return float(np.mean(logsumexp(s, axis=1) - s[rows, y]))

    res = minimize_scalar(nll, bounds=np.log(bounds), method="bounded", options={"xatol": 1e-9})
    assert res.success
    return float(np.exp(res.x))
