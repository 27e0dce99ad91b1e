"""Independent exact reference: brute-force conditioning of the joint Gaussian of
``(z_{0:T-1}, w_{0:T-1})`` written as one dense multivariate normal (numpy, float64).

Nothing here shares code with ``inference.kalman``; the model is given in plain dense form:
``m0 (d,)``, ``P0 (d, d)``, ``A (T-1, d, d)``, ``b (T-1, d)``, ``Q (T-1, d, d)`` and, per step,
the observed rows only: ``obs[t] = (y (n,), H (n, d), R (n, n))`` (``n`` may be 0).
"""

from typing import NamedTuple

import numpy as np


class DenseModel(NamedTuple):
    m0: np.ndarray
    P0: np.ndarray
    A: np.ndarray
    b: np.ndarray
    Q: np.ndarray
    obs: list  # per step: (y, H, R) of the observed rows


def prior_information(model: DenseModel, T: int):
    """Precision ``(T*d, T*d)`` and information vector of the latent path prior, built from the
    Markov factorisation (block-tridiagonal), without forming the prior covariance, which can be
    huge for explosive dynamics and would cost the reference its accuracy."""
    d = model.m0.shape[0]
    Lam = np.zeros((T * d, T * d))
    eta = np.zeros(T * d)
    P0i = np.linalg.inv(model.P0)
    Lam[:d, :d] += P0i
    eta[:d] += P0i @ model.m0
    for t in range(T - 1):
        A, b, Qi = model.A[t], model.b[t], np.linalg.inv(model.Q[t])
        i, j = slice(t * d, (t + 1) * d), slice((t + 1) * d, (t + 2) * d)
        Lam[i, i] += A.T @ Qi @ A
        Lam[j, j] += Qi
        Lam[i, j] -= A.T @ Qi
        Lam[j, i] -= Qi @ A
        eta[i] -= A.T @ Qi @ b
        eta[j] += Qi @ b
    return Lam, eta


def _gauss_logpdf(x, mean, cov):
    r = x - mean
    sign, logdet = np.linalg.slogdet(cov)
    assert sign > 0
    return -0.5 * (r @ np.linalg.solve(cov, r) + logdet + len(r) * np.log(2 * np.pi))


def prior_logpdf(model: DenseModel, z):
    d = model.m0.shape[0]
    zs = z.reshape(-1, d)
    lp = _gauss_logpdf(zs[0], model.m0, model.P0)
    for t in range(len(zs) - 1):
        lp += _gauss_logpdf(zs[t + 1], model.A[t] @ zs[t] + model.b[t], model.Q[t])
    return lp


def _observations(model: DenseModel, steps, T):
    """Stacked ``y``, the map ``G`` from the latent path ``z_{0:T-1}`` to ``E[y]``, noise ``R``."""
    d = model.m0.shape[0]
    ys, Gs, Rs = [], [], []
    for t in steps:
        y, H, R = model.obs[t]
        if len(y) == 0:
            continue
        G = np.zeros((len(y), T * d))
        G[:, t * d : (t + 1) * d] = H
        ys.append(y)
        Gs.append(G)
        Rs.append(R)
    if not ys:
        return np.zeros(0), np.zeros((0, T * d)), np.zeros((0, 0))
    n = sum(len(y) for y in ys)
    R = np.zeros((n, n))
    i = 0
    for Rk in Rs:
        R[i : i + len(Rk), i : i + len(Rk)] = Rk
        i += len(Rk)
    return np.concatenate(ys), np.concatenate(Gs), R


def condition(model: DenseModel, steps, T=None):
    """Posterior mean/cov of the latent path ``z_{0:T-1}`` (default: all steps) given the
    observations of ``steps`` (all before ``T``), and ``log p(those observations)``; the path
    stops at ``T`` because later states do not change these marginals and, under explosive
    dynamics, would only cost digits. Information form:
    ``Lambda_post = Lambda_prior + G^T R^{-1} G``, and ``log p(y) = log p(y|z) + log p(z) -
    log p(z|y)`` evaluated at the posterior mean."""
    T = len(model.obs) if T is None else T
    Lam, eta = prior_information(model, T)
    y, G, R = _observations(model, steps, T)
    if len(y) > 0:
        Ri = np.linalg.inv(R)
        Lam = Lam + G.T @ Ri @ G
        eta = eta + G.T @ Ri @ y
    cov = np.linalg.inv(Lam)
    cov = 0.5 * (cov + cov.T)
    mean = np.linalg.solve(Lam, eta)
    if len(y) == 0:
        return mean, cov, 0.0
    ll = _gauss_logpdf(y, G @ mean, R) + prior_logpdf(model, mean) - _gauss_logpdf(mean, mean, cov)
    # (log p(y|z) + log p(z) - log p(z|y) is the same for every z: evaluated at the mean)
    return mean, cov, ll


def block(x, t, d):
    return x[t * d : (t + 1) * d]


def cblock(S, s, t, d):
    return S[s * d : (s + 1) * d, t * d : (t + 1) * d]


def conditional(mean, cov, d, target, given):
    """``z_target | z_given`` from a joint: returns ``(gain, offset, cov)``."""
    Sgg = cblock(cov, given, given, d)
    Stg = cblock(cov, target, given, d)
    gain = np.linalg.solve(Sgg, Stg.T).T
    offset = block(mean, target, d) - gain @ block(mean, given, d)
    c = cblock(cov, target, target, d) - gain @ Stg.T
    return gain, offset, 0.5 * (c + c.T)


class Reference(NamedTuple):
    predicted_mean: np.ndarray
    predicted_cov: np.ndarray
    filtered_mean: np.ndarray
    filtered_cov: np.ndarray
    log_likelihoods: np.ndarray
    smoothed_mean: np.ndarray
    smoothed_cov: np.ndarray
    cross_cov: np.ndarray
    backward: tuple  # (gain, offset, cov), each with leading T-1
    forward: tuple  # (gain, offset, cov), each with leading T-1
    posterior_mean: np.ndarray  # (T*d,)
    posterior_cov: np.ndarray  # (T*d, T*d)


def reference(model: DenseModel) -> Reference:
    d = model.m0.shape[0]
    T = len(model.obs)
    pm, pc, fm, fc, lls, bwd = [], [], [], [], [], []
    prev_ll = 0.0
    for t in range(T):
        mean, cov, _ = condition(model, range(t), t + 1)
        pm.append(block(mean, t, d))
        pc.append(cblock(cov, t, t, d))
        mean, cov, ll = condition(model, range(t + 1), min(t + 2, T))
        fm.append(block(mean, t, d))
        fc.append(cblock(cov, t, t, d))
        lls.append(ll - prev_ll)
        prev_ll = ll
        if t < T - 1:
            bwd.append(conditional(mean, cov, d, t, t + 1))
    mean, cov, _ = condition(model, range(T))
    sm = np.stack([block(mean, t, d) for t in range(T)])
    sc = np.stack([cblock(cov, t, t, d) for t in range(T)])
    cross = np.array([cblock(cov, t, t + 1, d) for t in range(T - 1)]).reshape(T - 1, d, d)
    fwd = [conditional(mean, cov, d, t + 1, t) for t in range(T - 1)]

    def stack(cs):
        if not cs:
            return (np.zeros((0, d, d)), np.zeros((0, d)), np.zeros((0, d, d)))
        return tuple(np.stack(x) for x in zip(*cs, strict=True))

    return Reference(
        np.stack(pm),
        np.stack(pc),
        np.stack(fm),
        np.stack(fc),
        np.array(lls),
        sm,
        sc,
        cross,
        stack(bwd),
        stack(fwd),
        mean,
        cov,
    )
