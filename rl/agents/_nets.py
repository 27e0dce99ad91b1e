"""The agents' networks as pure functions over plain parameter pytrees.

Agents keep their networks inside ``NamedTuple`` states (checkpointed as pytrees), so a network
here is a pair of pure functions ``init(key) -> params`` / ``apply(params, x)`` over a nested
dict of arrays: ``jit``, ``vmap``, ``lax.scan`` and optax see nothing but arrays, and no module
object lives in an agent's state. The network itself is the project's one MLP,
:class:`pssm.nets.MLP` (LeCun-normal weights, zero biases: ``nnx.Linear``'s defaults):

* :func:`network`: ``(init, apply)`` of any NNX module built by ``build(rngs)``, its parameters
  kept as NNX's pure dict (``{"layer0": {"kernel", "bias"}, ..., "out": {...}}`` for an MLP).
* :func:`mlp`: :func:`network` of ``pssm.nets.MLP(in, hidden, out)``:
  ``x -> W_L g(... g(W_1 x + c_1)) + c_L`` (linear output).
* :func:`ensemble`: ``K`` independent copies of a network, parameters stacked on a leading axis
  (``vmap`` of ``init`` over ``K`` keys and of ``apply`` over the stack; SAC's twin critics are
  ``K = 2``).
* :func:`gaussian_head`: an output ``y = [m, s]`` read as the mean ``mu = m`` and the log
  standard deviation ``log sigma = lo + (hi - lo)(tanh(s) + 1)/2`` (smoothly bounded in
  ``[lo, hi]``) of a diagonal Gaussian.
* :func:`tanh_gaussian_sample` / :func:`tanh_gaussian_log_prob`: the tanh-squashed Gaussian of
  Haarnoja et al. (2018, "Soft Actor-Critic Algorithms and Applications", App. C)::

      u = mu + sigma * eps,  eps ~ N(0, I),  a = tanh(u) in (-1, 1)^k,
      log pi(a) = sum_i [ log N(u_i; mu_i, sigma_i^2) - log(1 - tanh(u_i)^2) ],

  with ``log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2 u))`` (exact and stable for large
  ``|u|``). The noise ``eps`` is an argument, so the sample is reparameterised and reproducible.
* :func:`polyak`: ``target <- (1 - tau) target + tau online`` on every leaf.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pssm.nets import MLP

Activation = Callable[[jax.Array], jax.Array]
Params = Any  # a network's pure parameter dict (nested dicts of arrays)

_LOG_2PI = float(np.log(2.0 * np.pi))
_LOG_2 = float(np.log(2.0))


class Network(NamedTuple):
    """A network as pure functions: ``init(key) -> params``, ``apply(params, x) -> y``."""

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]


def network(build: Callable[[nnx.Rngs], nnx.Module]) -> Network:
    """``(init, apply)`` of the NNX module ``build(rngs)``, its parameters a pure dict.

    ``init(key)`` builds the module with ``nnx.Rngs(key)`` (so ``jax.vmap`` over keys gives
    independent stacked copies) and returns ``nnx.to_pure_dict`` of its state; ``apply(params,
    *args)`` merges them back into the module's structure and calls it.
    """
    graphdef, template = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))

    def init(key):
        return nnx.to_pure_dict(nnx.split(build(nnx.Rngs(key)))[1])

    def apply(params, *args, **kwargs):
        state = jax.tree.map(lambda v: v, template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)(*args, **kwargs)

    return Network(init, apply)


def mlp(
    in_features: int,
    hidden: Sequence[int],
    out_features: int,
    *,
    activation: Activation = nnx.elu,
    dtype=None,
) -> Network:
    """:func:`network` of :class:`pssm.nets.MLP` ``in_features -> hidden -> out_features``
    (``activation`` after every hidden layer, linear output; ``dtype``: parameter dtype,
    ``None``: ``float``'s)."""
    sizes = [int(in_features), *(int(h) for h in hidden), int(out_features)]
    if any(s < 1 for s in sizes):
        raise ValueError(f"an MLP needs positive layer sizes (in, ..., out), got {sizes}")
    return network(
        lambda rngs: MLP(
            sizes[0], sizes[1:-1], sizes[-1], activation=activation, param_dtype=dtype, rngs=rngs
        )
    )


def ensemble(net: Network, num: int) -> Network:
    """``num`` independent copies of ``net``: ``init(key)`` stacks ``net.init`` of
    ``jax.random.split(key, num)`` on a leading axis; ``apply(params, x) -> (num, ...)``."""
    if num < 1:
        raise ValueError(f"an ensemble needs at least one member, got num={num}")

    def init(key):
        return jax.vmap(net.init)(jax.random.split(key, num))

    def apply(params, *args):
        return jax.vmap(lambda p: net.apply(p, *args))(params)

    return Network(init, apply)


def gaussian_head(
    out: jax.Array, log_std_bounds: tuple[float, float] = (-5.0, 2.0)
) -> tuple[jax.Array, jax.Array]:
    """``y (..., 2k) -> (mean, log_std)``, each ``(..., k)``, ``log_std`` in ``log_std_bounds``."""
    lo, hi = log_std_bounds
    mean, raw = jnp.split(out, 2, axis=-1)
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


def polyak(target, online, tau: float):
    """``(1 - tau) * target + tau * online`` leaf by leaf (Polyak / exponential averaging)."""
    return jax.tree.map(lambda t, o: (1.0 - tau) * t + tau * o, target, online)
