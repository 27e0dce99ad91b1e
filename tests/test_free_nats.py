"""Free nats and KL balancing (inference.objectives.FreeNatsELBO) against the closed form.

One latent site ``z_0 ~ N(mu_p, s_p^2)`` per batch element, guide ``N(mu_q, s_q^2)``, no
observations: the loss is ``sum_b max(KL_b, free)`` and its gradient, with balance ``alpha``,
is ``alpha dKL/dprior`` for the prior's parameters and ``(1 - alpha) dKL/dposterior`` for the
posterior's (DreamerV2's KL balancing), zero where the KL is below the free nats.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.objectives import FreeNatsELBO


def model():
    mu, s = numpyro.param("mu_p", jnp.zeros(3)), numpyro.param("s_p", jnp.ones(3))
    with numpyro.plate("batch", 3):
        numpyro.sample("z_0", dist.Normal(mu, s))


def guide():
    mu, s = numpyro.param("mu_q", jnp.zeros(3)), numpyro.param("s_q", jnp.ones(3))
    with numpyro.plate("batch", 3):
        numpyro.sample("z_0", dist.Normal(mu, s))


def closed_kl(p):
    a, s1, b, s2 = p["mu_q"], p["s_q"], p["mu_p"], p["s_p"]
    return jnp.log(s2 / s1) + (s1**2 + (a - b) ** 2) / (2 * s2**2) - 0.5


@settings(max_examples=20, deadline=None)
@given(
    alpha=st.one_of(st.none(), st.floats(0.0, 1.0)),
    free=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 10**6),
)
def test_balanced_free_nats_value_and_gradient_split(alpha, free, seed):
    rng = np.random.default_rng(seed)
    p = {"mu_p": rng.normal(size=3), "s_p": rng.uniform(0.5, 2, 3),
         "mu_q": rng.normal(size=3), "s_q": rng.uniform(0.5, 2, 3)}  # fmt: skip
    p = {k: jnp.asarray(v) for k, v in p.items()}
    elbo = FreeNatsELBO(free, balance=alpha)

    def loss(p):
        return elbo.loss_with_metrics(jax.random.key(0), p, model, guide)["loss"]

    kl = closed_kl(p)
    np.testing.assert_allclose(loss(p), jnp.sum(jnp.maximum(kl, free)), rtol=1e-10)
    grad, ref = jax.grad(loss)(p), jax.grad(lambda p: jnp.sum(closed_kl(p)))(p)
    active = kl > free
    a = 1.0 if alpha is None else alpha
    b = 1.0 if alpha is None else 1.0 - alpha
    for name, weight in (("mu_p", a), ("s_p", a), ("mu_q", b), ("s_q", b)):
        np.testing.assert_allclose(grad[name], np.where(active, weight * ref[name], 0.0),
                                   rtol=1e-9, atol=1e-12)  # fmt: skip
    metrics = elbo.loss_with_metrics(jax.random.key(0), p, model, guide)["metrics"]
    np.testing.assert_allclose(metrics["kl"], jnp.sum(kl), rtol=1e-10)


def test_balance_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="balance"):
        FreeNatsELBO(3.0, balance=1.5)
