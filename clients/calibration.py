"""Temperature scaling of a legacy model's softmax (for the calibrated confidence baseline).

Guo, Pleiss, Sun, Weinberger 2017, "On Calibration of Modern Neural Networks", ICML (arXiv
1706.04599), section 4.2: one scalar ``T > 0`` divides the logits, ``softmax(z / T)``, fitted by
minimising the negative log-likelihood on held-out labelled samples; the argmax (the prediction)
does not change, only the confidence. docs/methods.md §4 says where it is used.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

LOG_T_BOUNDS = (-5.0, 5.0)
"""Search interval of ``log T``: T from 0.0067 to 148, far beyond what a trained classifier needs
(Guo et al. report T of 1 to 3); a bound hit means the logits carry no usable signal."""


def nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``y (M,)`` under ``softmax(logits / T)``, ``logits (M, K)``."""
    lp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-lp[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature ``T`` minimising :func:`nll` on held-out ``logits (M, K)`` and labels ``y (M,)``
    (a bounded 1-D search over ``log T``, :data:`LOG_T_BOUNDS`); 1.0 (no scaling) when ``M = 0``."""
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return 1.0
    res = minimize_scalar(lambda lt: nll(logits, y, float(np.exp(lt))), bounds=LOG_T_BOUNDS, method="bounded",
                          options={"xatol": 1e-4})
    return float(np.exp(res.x))
