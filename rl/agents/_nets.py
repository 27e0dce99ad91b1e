"""Small pure-JAX networks shared by the agents, as plain parameter pytrees.

Agents keep their networks inside ``NamedTuple`` states, so the networks here are pairs of pure
functions ``init(key, ...) -> params`` / ``apply(params, x)`` over nested tuples and dicts of
arrays: ``jit``, ``vmap``, ``lax.scan`` and optax see nothing but arrays, and no module object
has to be split or merged on every call. Initialisation follows Flax's ``nnx.Linear`` defaults
(LeCun-normal weights, zero biases).

* :func:`mlp_init` / :func:`mlp_apply`: ``x -> W_L g(... g(W_1 x + c_1)) + c_L`` (linear output).
* :func:`gaussian_policy_init` / :func:`gaussian_policy`: an MLP emitting the mean ``mu`` and
  the log standard deviation of a diagonal Gaussian, ``log sigma = lo + (hi - lo)(tanh(y) + 1)/2``
  (smoothly bounded in ``[lo, hi]``).
* :func:`tanh_gaussian_sample` / :func:`tanh_gaussian_log_prob`: the tanh-squashed Gaussian of
  Haarnoja et al. (2018, "Soft Actor-Critic Algorithms and Applications", App. C)::

      u = mu + sigma * eps,  eps ~ N(0, I),  a = tanh(u) in (-1, 1)^k,
      log pi(a) = sum_i [ log N(u_i; mu_i, sigma_i^2) - log(1 - tanh(u_i)^2) ],

  with ``log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2 u))`` (exact and stable for large
  ``|u|``). The noise ``eps`` is an argument, so the sample is reparameterised and reproducible.
* :func:`q_ensemble_init` / :func:`q_ensemble_apply`: ``K`` independent MLPs
  ``Q_k([s, a]) -> R`` stored with a leading ensemble axis and evaluated with ``vmap``
  (SAC's twin critics are ``K = 2``).
* :func:`polyak`: ``target <- (1 - tau) target + tau online`` on every leaf.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Activation = Callable[[jax.Array], jax.Array]
Params = tuple  # tuple of {"w": (n_in, n_out), "b": (n_out,)} layers

_LOG_2PI = float(np.log(2.0 * np.pi))
_LOG_2 = float(np.log(2.0))


def _check_sizes(sizes: Sequence[int]) -> list[int]:
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise ValueError(f"an MLP needs >= 2 positive layer sizes (in, ..., out), got {sizes}")
    return sizes


def mlp_init(key: jax.Array, sizes: Sequence[int], dtype=None) -> Params:
    """Parameters of an MLP with layer sizes ``sizes = (in, hidden..., out)``.

    Args:
        key: PRNG key.
        sizes: input size, hidden sizes, output size (at least two entries, all positive).
        dtype: parameter dtype (default: ``float``'s, i.e. float64 under ``jax_enable_x64``).

    Returns:
        A tuple of ``{"w": (n_in, n_out), "b": (n_out,)}``, one per layer.
    """
    sizes = _check_sizes(sizes)
    dtype = jnp.result_type(float) if dtype is None else dtype
    init_w = jax.nn.initializers.lecun_normal()
    keys = jax.random.split(key, len(sizes) - 1)
    return tuple(
        {"w": init_w(k, (n_in, n_out), dtype), "b": jnp.zeros((n_out,), dtype)}
        for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:], strict=True)
    )


def mlp_apply(params: Params, x: jax.Array, activation: Activation = jax.nn.relu) -> jax.Array:
    """``x (..., in) -> (..., out)``: ``activation`` after every layer but the last."""
    for layer in params[:-1]:
        x = activation(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def gaussian_policy_init(
    key: jax.Array, obs_dim: int, hidden: Sequence[int], action_dim: int, dtype=None
) -> Params:
    """An MLP ``obs_dim -> hidden -> 2 * action_dim`` (mean and raw log-std halves)."""
    return mlp_init(key, (obs_dim, *hidden, 2 * action_dim), dtype)


def gaussian_policy(
    params: Params,
    obs: jax.Array,
    activation: Activation = jax.nn.relu,
    log_std_bounds: tuple[float, float] = (-5.0, 2.0),
) -> tuple[jax.Array, jax.Array]:
    """``obs (..., p) -> (mean, log_std)``, each ``(..., k)``, ``log_std`` in ``log_std_bounds``."""
    lo, hi = log_std_bounds
    mean, raw = jnp.split(mlp_apply(params, obs, activation), 2, axis=-1)
    return mean, lo + 0.5 * (hi - lo) * (jnp.tanh(raw) + 1.0)


def tanh_gaussian_log_prob(mean: jax.Array, log_std: jax.Array, pre_tanh: jax.Array) -> jax.Array:
    """``log pi(tanh(u))`` for ``u = pre_tanh`` under ``N(mean, exp(log_std)^2)``, summed over
    the last axis (change of variables through ``tanh``)."""
    z = (pre_tanh - mean) * jnp.exp(-log_std)
    log_normal = -0.5 * z**2 - log_std - 0.5 * _LOG_2PI
    log_det = 2.0 * (_LOG_2 - pre_tanh - jax.nn.softplus(-2.0 * pre_tanh))
    return jnp.sum(log_normal - log_det, axis=-1)


def tanh_gaussian_sample(
    mean: jax.Array, log_std: jax.Array, noise: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Reparameterised sample ``a = tanh(mean + exp(log_std) * noise)`` and its ``log pi(a)``.

    Returns:
        ``(action (..., k) in (-1, 1), log_prob (...))``.
    """
    u = mean + jnp.exp(log_std) * noise
    return jnp.tanh(u), tanh_gaussian_log_prob(mean, log_std, u)


def q_ensemble_init(
    key: jax.Array, num: int, in_dim: int, hidden: Sequence[int], dtype=None
) -> Params:
    """``num`` independent MLPs ``in_dim -> hidden -> 1``, stacked on a leading axis."""
    if num < 1:
        raise ValueError(f"need at least one Q network, got num={num}")
    sizes = (in_dim, *hidden, 1)
    _check_sizes(sizes)
    return jax.vmap(lambda k: mlp_init(k, sizes, dtype))(jax.random.split(key, num))


def q_ensemble_apply(
    params: Params, obs: jax.Array, action: jax.Array, activation: Activation = jax.nn.relu
) -> jax.Array:
    """``Q_k([obs, action])`` for every ensemble member: ``(..., p), (..., k) -> (K, ...)``."""
    x = jnp.concatenate([obs, action], axis=-1)
    return jax.vmap(lambda p: mlp_apply(p, x, activation)[..., 0])(params)


def polyak(target, online, tau: float):
    """``(1 - tau) * target + tau * online`` leaf by leaf (Polyak / exponential averaging)."""
    return jax.tree.map(lambda t, o: (1.0 - tau) * t + tau * o, target, online)
