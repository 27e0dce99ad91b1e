"""Return estimates on imagined trajectories: lambda-returns and discount weights.

Time runs along the leading axis (as :func:`rl.world_model.imagine_rollout` returns it): rewards
``r_t`` (``t = 0..H-1``, the reward of arriving in state ``t+1``), values ``v_t = V(s_t)``
(``t = 0..H``) and per-step discounts ``gamma_t`` (a constant ``gamma`` or a predicted
continuation probability times ``gamma``). The lambda-return (Sutton & Barto 2018, Sec. 12.1;
Hafner et al. 2020, "Dream to Control", Eq. 6) is defined recursively backwards::

    R_H = v_H
    R_t = r_t + gamma_t * ((1 - lambda) * v_{t+1} + lambda * R_{t+1}),   t = H-1, ..., 0

which equals the exponentially weighted mixture of ``n``-step returns of Dreamer's Eq. 6,
``R_t = (1 - lambda) sum_{n=1}^{H-t-1} lambda^{n-1} V^n_t + lambda^{H-t-1} V^{H-t}_t`` with
``V^n_t = sum_{k=t}^{t+n-1} (prod_{j=t}^{k-1} gamma_j) r_k + (prod_{j=t}^{t+n-1} gamma_j) v_{t+n}``.
``lambda = 0`` gives one-step TD targets ``r_t + gamma_t v_{t+1}``, ``lambda = 1`` the discounted
reward sum bootstrapped with ``v_H``.

:func:`discount_weights` gives ``w_t = prod_{j<t} gamma_j`` (``w_0 = 1``): Dreamer weighs the
loss of imagined step ``t`` by it, so later steps, reached with lower probability (or further
discounted), count less.
"""

import jax
import jax.numpy as jnp


def _as_discounts(discounts, rewards):
    discounts = jnp.asarray(discounts, dtype=jnp.result_type(rewards, float))
    if discounts.ndim == 0:
        return jnp.broadcast_to(discounts, rewards.shape)
    if discounts.shape != rewards.shape:
        raise ValueError(
            f"discounts must be a scalar or have the rewards' shape {rewards.shape}, "
            f"got {discounts.shape}"
        )
    return discounts


def lambda_returns(rewards, values, discounts, lam: float) -> jax.Array:
    """Lambda-returns ``R_t``, ``t = 0..H-1`` (see the module docstring).

    Args:
        rewards: ``(H, ...)``: ``r_t``, the reward of the step from ``s_t`` to ``s_{t+1}``.
        values: ``(H+1, ...)``: ``v_t = V(s_t)``, ``v_H`` bootstraps the tail.
        discounts: scalar or ``(H, ...)``: ``gamma_t`` applied to what follows ``r_t``.
        lam: ``lambda`` in ``[0, 1]``.

    Returns:
        ``(H, ...)`` lambda-returns (differentiable in all inputs).
    """
    rewards = jnp.asarray(rewards)
    values = jnp.asarray(values)
    if rewards.ndim < 1 or rewards.shape[0] < 1:
        raise ValueError(f"rewards need a leading time axis of length >= 1, got {rewards.shape}")
    if values.shape != (rewards.shape[0] + 1, *rewards.shape[1:]):
        raise ValueError(
            f"values must have shape (H+1, ...) = {(rewards.shape[0] + 1, *rewards.shape[1:])} "
            f"for rewards of shape {rewards.shape}, got {values.shape}"
        )
    if isinstance(lam, int | float) and not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    discounts = _as_discounts(discounts, rewards)
    # R_t = [r_t + gamma_t (1 - lam) v_{t+1}] + gamma_t lam R_{t+1}
    inputs = rewards + discounts * (1.0 - lam) * values[1:]

    def step(R_next, xs):
        x, d = xs
        R = x + d * lam * R_next
        return R, R

    _, R = jax.lax.scan(step, values[-1], (inputs, discounts), reverse=True)
    return R


def discount_weights(discounts, horizon: int | None = None, shape=()) -> jax.Array:
    """Weights ``w_t = prod_{j<t} gamma_j`` (``w_0 = 1``), ``t = 0..H-1``.

    Args:
        discounts: ``(H, ...)`` per-step discounts, or a scalar ``gamma`` (then ``horizon`` and
            optionally the trailing ``shape`` are required).
        horizon: ``H`` when ``discounts`` is a scalar.
        shape: trailing batch shape when ``discounts`` is a scalar.

    Returns:
        ``(H, ...)`` weights (no gradient: they only weigh losses).
    """
    discounts = jnp.asarray(discounts, dtype=jnp.result_type(discounts, float))
    if discounts.ndim == 0:
        if horizon is None or horizon < 1:
            raise ValueError("a scalar discount needs horizon >= 1")
        discounts = jnp.broadcast_to(discounts, (horizon, *shape))
    w = jnp.cumprod(jnp.concatenate([jnp.ones_like(discounts[:1]), discounts[:-1]]), axis=0)
    return jax.lax.stop_gradient(w)
