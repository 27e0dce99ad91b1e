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


def latent_joint(model: DenseModel):
    """Mean ``(T*d,)`` and covariance ``(T*d, T*d)`` of the stacked latent path."""
    d = model.m0.shape[0]
    T = len(model.obs)
    # z = M @ [z0, q_0, ..., q_{T-2}] + c with independent blocks.
    M = np.zeros((T * d, T * d))
    c = np.zeros(T * d)
    M[:d, :d] = np.eye(d)
    c[:d] = model.m0
    for t in range(1, T):
        A = model.A[t - 1]
        M[t * d:(t + 1) * d] = A @ M[(t - 1) * d:t * d]
        M[t * d:(t + 1) * d, t * d:(t + 1) * d] += np.eye(d)
        c[t * d:(t + 1) * d] = A @ c[(t - 1) * d:t * d] + model.b[t - 1]
    noise = np.zeros((T * d, T * d))
    noise[:d, :d] = model.P0
    for t in range(1, T):
        noise[t * d:(t + 1) * d, t * d:(t + 1) * d] = model.Q[t - 1]
    return c, M @ noise @ M.T


def _observations(model: DenseModel, steps):
    """Stacked ``y``, the map ``G`` from the latent path to ``E[y]`` and the noise ``R``."""
    d = model.m0.shape[0]
    T = len(model.obs)
    ys, Gs, Rs = [], [], []
    for t in steps:
        y, H, R = model.obs[t]
        if len(y) == 0:
            continue
        G = np.zeros((len(y), T * d))
        G[:, t * d:(t + 1) * d] = H
        ys.append(y)
        Gs.append(G)
        Rs.append(R)
    if not ys:
        return np.zeros(0), np.zeros((0, T * d)), np.zeros((0, 0))
    n = sum(len(y) for y in ys)
    R = np.zeros((n, n))
    i = 0
    for Rk in Rs:
        R[i:i + len(Rk), i:i + len(Rk)] = Rk
        i += len(Rk)
    return np.concatenate(ys), np.concatenate(Gs), R


def condition(model: DenseModel, steps):
    """Posterior mean/cov of the whole latent path given the observations of ``steps``, and
    ``log p(those observations)``."""
    mu, S = latent_joint(model)
    y, G, R = _observations(model, steps)
    if len(y) == 0:
        return mu, S, 0.0
    Syy = G @ S @ G.T + R
    K = np.linalg.solve(Syy, G @ S).T
    r = y - G @ mu
    mean = mu + K @ r
    cov = S - K @ Syy @ K.T
    sign, logdet = np.linalg.slogdet(Syy)
    assert sign > 0
    ll = -0.5 * (r @ np.linalg.solve(Syy, r) + logdet + len(y) * np.log(2 * np.pi))
    return mean, 0.5 * (cov + cov.T), ll


def block(x, t, d):
    return x[t * d:(t + 1) * d]


def cblock(S, s, t, d):
    return S[s * d:(s + 1) * d, t * d:(t + 1) * d]


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
        mean, cov, _ = condition(model, range(t))
        pm.append(block(mean, t, d))
        pc.append(cblock(cov, t, t, d))
        mean, cov, ll = condition(model, range(t + 1))
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
        np.stack(pm), np.stack(pc), np.stack(fm), np.stack(fc), np.array(lls), sm, sc, cross,
        stack(bwd), stack(fwd), mean, cov,
    )
