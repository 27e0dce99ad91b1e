"""A tiny analytic :class:`rl.world_model.WorldModel` for agent tests.

Diagonal linear-Gaussian latent with one action per latent dimension (``d = u``)::

    z_0 ~ N(m0, diag(p0)),   z_{t+1} = A * z_t + B * a_t + w_t,  w_t ~ N(0, diag(q)),
    o_t = z_t + v_t,  v_t ~ N(0, diag(r)),     reward of arriving in z:  -|z - target|^2

(elementwise products). The belief is the Gaussian ``N(mean, diag(var))``; ``observe`` is the
exact Kalman update (``inference.kalman.update``); ``imagine`` is the Kalman prediction
(``inference.kalman.predict``) whose mean also receives a sample of the process noise scaled
by ``noise`` (``noise = 0``: the exact, deterministic prediction); features are the belief
mean. The objective is the exact negative log-likelihood ``-log p(o_{0:T-1} | a)`` of the
observations, averaged over the batch (prediction-error decomposition of the Kalman filter).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from inference import kalman
from inference.training import Objective
from rl.world_model import WorldModel


class ToyBelief(NamedTuple):
    mean: jax.Array  # (B, d)
    var: jax.Array  # (B, d)


def _constrain(train):
    return {
        "A": train["A"],
        "B": train["B"],
        "q": jnp.exp(train["log_q"]),
        "r": jnp.exp(train["log_r"]),
        "m0": train["m0"],
        "p0": jnp.exp(train["log_p0"]),
        "target": train["target"],
    }


def _unconstrain(params):
    return {
        "A": params["A"],
        "B": params["B"],
        "log_q": jnp.log(params["q"]),
        "log_r": jnp.log(params["r"]),
        "m0": params["m0"],
        "log_p0": jnp.log(params["p0"]),
        "target": params["target"],
    }


def toy_world_model(
    dim: int = 1,
    *,
    A=1.0,
    B=0.5,
    q=1e-2,
    r=1e-2,
    m0=0.0,
    p0=1.0,
    target=0.0,
    noise: float = 0.0,
    shared_noise: bool = False,
):
    """The toy model and its constrained parameters.

    Args:
        dim: latent, observation and action dimension.
        A, B, q, r, m0, p0, target: scalars or ``(dim,)`` arrays (see the module docstring).
        noise: scale of the process-noise sample ``imagine`` adds to the predicted mean.
        shared_noise: draw one noise sample ``(dim,)`` per ``imagine`` call, shared by the whole
            batch (like an MC-dropout mask shared over a batch), instead of one per row.

    Returns:
        ``(world_model, params)`` with ``params`` the constrained values the protocol's
        functions take.
    """

    def vec(x):
        return jnp.broadcast_to(jnp.asarray(x, dtype=float), (dim,))

    params = {
        "A": vec(A),
        "B": vec(B),
        "q": vec(q),
        "r": vec(r),
        "m0": vec(m0),
        "p0": vec(p0),
        "target": vec(target),
    }

    def init_belief(params, batch_size):
        shape = (batch_size, dim)
        return ToyBelief(
            jnp.broadcast_to(params["m0"], shape), jnp.broadcast_to(params["p0"], shape)
        )

    def update(params, belief, obs, mask):
        """``(posterior, log-likelihood)`` of one step's observations."""
        r = jnp.broadcast_to(params["r"], obs.shape)
        post, ll = kalman.update(kalman.Gaussian(*belief), obs, r, mask)
        return ToyBelief(*post), ll

    def observe(params, key, belief, obs, mask=None):
        del key
        return update(params, belief, obs, mask)[0]

    def predict(params, belief, action):
        dynamics = kalman.Dynamics(params["A"], params["B"] * action, params["q"])
        return ToyBelief(*kalman.predict(kalman.Gaussian(*belief), dynamics))

    def imagine(params, key, belief, action):
        pred = predict(params, belief, action)
        if not noise:
            return pred
        shape = pred.mean.shape[-1:] if shared_noise else pred.mean.shape
        sample = noise * jnp.sqrt(params["q"]) * jax.random.normal(key, shape)
        return pred._replace(mean=pred.mean + sample)

    def features(params, belief):
        return belief.mean

    def reward(params, f):
        return -jnp.sum((f - params["target"]) ** 2, axis=-1)

    def log_likelihood(params, obs, actions, mask=None):
        """Per-sequence ``log p(o | a)`` ``(B,)`` by the Kalman filter (masked steps skipped)."""
        Bsz, T = obs.shape[:2]
        if mask is None:
            mask = jnp.ones((Bsz, T), bool)

        def step(b, xs):
            o, a, m = xs
            post, ll = update(params, b, o, m)
            return predict(params, post, a), ll

        xs = (jnp.moveaxis(obs, 1, 0), jnp.moveaxis(actions, 1, 0), jnp.moveaxis(mask, 1, 0))
        _, ll = jax.lax.scan(step, init_belief(params, Bsz), xs)
        return ll.sum(0)

    def obj_init(key, batch):
        del key, batch
        return _unconstrain(params), ()

    def obj_loss(train, aux, key, batch):
        del key
        ll = log_likelihood(_constrain(train), batch["obs"], batch["actions"], batch.get("mask"))
        loss = -jnp.mean(ll)
        return loss, {"loss": loss, "log_likelihood": -loss}, aux

    wm = WorldModel(
        objective=Objective(init=obj_init, loss=obj_loss, constrain=_constrain),
        init_belief=init_belief,
        observe=observe,
        imagine=imagine,
        features=features,
        reward=reward,
        feature_size=dim,
        action_dim=dim,
    )
    return wm, params
