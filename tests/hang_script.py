"""A user's own training script (no ``rl`` import, no CPU settings): a dense LGSSM's smoother
and filter under ``vmap`` inside a jitted ELBO gradient, the program that hung jaxlib 0.10's
batched LAPACK calls (``inference/kalman/_lapack_guard.py``).

Run as ``python tests/hang_script.py D T BATCH CALLS``; prints ``ok <loss>`` when done.
"""

import sys

import jax
import jax.numpy as jnp

from inference import kalman


def main(d: int, T: int, batch: int, calls: int) -> None:
    w = jax.random.normal(jax.random.PRNGKey(0), (batch, T, d))
    prior = kalman.Gaussian(jnp.zeros(d), jnp.eye(d))

    def loss(params, w):
        dyn = kalman.Dynamics(
            jnp.eye(d) * 0.9 + 0.01 * params["A"], jnp.zeros(d), jnp.eye(d) * jnp.exp(params["q"])
        )
        em = lambda w: kalman.Emissions(w, jnp.eye(d) * jnp.exp(params["r"]))  # noqa: E731

        def smoothing_bound(w):
            post = kalman.smoother(prior, dyn, em(w))
            return post.log_likelihood - jnp.sum(kalman.expected_kl(post, dyn))

        def filtering(w):
            return kalman.filter(prior, dyn, em(w)).log_likelihood

        return -jnp.mean(jax.vmap(smoothing_bound)(w)) - jnp.mean(jax.vmap(filtering)(w))

    params = {"A": jnp.zeros((d, d)), "q": jnp.array(-1.0), "r": jnp.array(0.0)}
    step = jax.jit(jax.value_and_grad(loss))
    for _ in range(calls):
        value, grads = step(params, w)
        params = jax.tree.map(lambda p, g: p - 1e-4 * g, params, grads)
        jax.block_until_ready(params)
    print("ok", float(value), flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:5]))
