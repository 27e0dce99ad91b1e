"""Random latent LGSSMs for property tests, in the kernels' form and in the reference's form."""

from typing import NamedTuple

import numpy as np
from hypothesis import strategies as st

from inference import kalman
from tests.kalman_reference import DenseModel


class Case(NamedTuple):
    prior: kalman.Gaussian
    dynamics: kalman.Dynamics
    emissions: kalman.Emissions
    dense: DenseModel
    diagonal: bool


def _variances(rng, shape, ill):
    if ill:
        return np.exp(rng.uniform(np.log(1e-4), np.log(1e3), shape))
    return rng.uniform(0.2, 2.0, shape)


def _spd(rng, d, ill, lead=()):
    lam = _variances(rng, (*lead, d), ill)
    U = np.linalg.qr(rng.normal(size=(*lead, d, d)))[0]
    return np.einsum("...ij,...j,...kj->...ik", U, lam, U)


def random_case(
    seed: int,
    d: int,
    T: int,
    K: int,
    diagonal: bool,
    time_varying: bool,
    ill: bool,
    missing: float = 0.3,
) -> Case:
    rng = np.random.default_rng(seed)
    lead = (T - 1,) if time_varying else ()
    m0 = rng.normal(size=d)
    if diagonal:
        P0 = _variances(rng, d, ill)
        A = rng.uniform(-1.05, 1.05, (*lead, d))
        Q = _variances(rng, (*lead, d), ill)
    else:
        P0 = _spd(rng, d, ill)
        # mildly explosive at most (spectral radius <= 1.05): over 40 steps variances grow at
        # most ~50x, so the float64 reference keeps its digits
        U = np.linalg.qr(rng.normal(size=(*lead, d, d)))[0]
        V = np.linalg.qr(rng.normal(size=(*lead, d, d)))[0]
        A = np.einsum("...ij,...j,...jk->...ik", U, rng.uniform(0.0, 1.05, (*lead, d)), V)
        Q = _spd(rng, d, ill, lead)
    b = rng.normal(size=(*lead, d))
    At = np.broadcast_to(A, (T - 1, *A.shape[-(1 if diagonal else 2) :]))
    Qt = np.broadcast_to(Q, At.shape)
    bt = np.broadcast_to(b, (T - 1, d))
    if diagonal:
        At, Qt = (
            np.array([np.diag(a) for a in At]).reshape(T - 1, d, d),
            np.array([np.diag(q) for q in Qt]).reshape(T - 1, d, d),
        )
    obs = [([], [], []) for _ in range(T)]

    if diagonal:
        w = rng.normal(size=(T, K, d)) * 2.0
        R = _variances(rng, (T, K, d) if time_varying else (K, d), ill)
        per_entry = rng.random() < 0.5
        mask = rng.random((T, K, d) if per_entry else (T, K)) > missing
        if T > 2:
            mask[rng.integers(T)] = False  # one fully missing step
        full = np.broadcast_to(mask.reshape(mask.shape + (1,) * (3 - mask.ndim)), (T, K, d))
        Rt = np.broadcast_to(R, (T, K, d))
        w = np.where(full, w, np.nan)  # missing entries may hold NaN: must not leak
        for t in range(T):
            for k in range(K):
                for i in range(d):
                    if full[t, k, i]:
                        obs[t][0].append(w[t, k, i])
                        obs[t][1].append(np.eye(d)[i])
                        obs[t][2].append(Rt[t, k, i])
        obs = [(np.array(y), np.array(H).reshape(len(y), d), np.diag(R)) for y, H, R in obs]
        if K == 1 and rng.random() < 0.5:  # also exercise the (T, d) single-sensor form
            w, R = w[:, 0], R[..., 0, :]
            mask = mask[:, 0]
        emissions = kalman.Emissions(w, R, mask)
        dense = DenseModel(m0, np.diag(P0), At, bt, Qt, obs)
    else:
        sensors = []
        for _ in range(K):
            p = int(rng.integers(1, 4))
            H = rng.normal(size=((T, p, d) if time_varying else (p, d)))
            R = _spd(rng, p, ill, (T,) if time_varying else ())
            m = rng.random(T) > missing
            w = rng.normal(size=(T, p)) * 2.0
            w = np.where(m[:, None], w, np.nan)
            sensors.append(kalman.Emissions(w, R, m, H))
        if T > 2:
            t0 = rng.integers(T)
            sensors = [s._replace(mask=s.mask.copy()) for s in sensors]
            for s in sensors:
                s.mask[t0] = False
        for t in range(T):
            ys, Hs, Rs = [], [], []
            for s in sensors:
                if s.mask[t]:
                    ys.append(s.w[t])
                    Hs.append(s.H[t] if s.H.ndim == 3 else s.H)
                    Rs.append(s.R[t] if s.R.ndim == 3 else s.R)
            n = sum(len(y) for y in ys)
            Rb = np.zeros((n, n))
            i = 0
            for Rk in Rs:
                Rb[i : i + len(Rk), i : i + len(Rk)] = Rk
                i += len(Rk)
            obs[t] = (
                np.concatenate(ys) if ys else np.zeros(0),
                np.concatenate(Hs) if Hs else np.zeros((0, d)),
                Rb,
            )
        emissions = kalman.stack_sensors(sensors) if K > 1 else sensors[0]
        dense = DenseModel(m0, P0, At, bt, Qt, obs)
    return Case(kalman.Gaussian(m0, P0), kalman.Dynamics(A, b, Q), emissions, dense, diagonal)


class Spec(NamedTuple):
    """What a random case is drawn from (hypothesis shows this, not the arrays)."""

    seed: int
    d: int
    T: int
    K: int
    diagonal: bool
    time_varying: bool
    ill: bool

    def build(self) -> Case:
        return random_case(*self)


@st.composite
def specs(draw, max_d=6, max_T=40, max_K=3, diagonal=None, ill=None):
    return Spec(
        seed=draw(st.integers(0, 2**31 - 1)),
        d=draw(st.integers(1, max_d)),
        T=draw(st.integers(1, max_T)),
        K=draw(st.integers(1, max_K)),
        diagonal=draw(st.booleans()) if diagonal is None else diagonal,
        time_varying=draw(st.booleans()),
        ill=draw(st.booleans()) if ill is None else ill,
    )
