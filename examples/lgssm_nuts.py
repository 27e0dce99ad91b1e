"""NUTS on the parameters of a small linear-Gaussian SSM, latent path marginalised exactly.

Model (2-d latent, both coordinates observed, some steps missing)::

    z_0 ~ N(0, I),   z_{t+1} = rho R(theta) z_t + N(0, q^2 I),   w_t = z_t + N(0, r^2 I)

with ``R(theta)`` the rotation by ``theta`` and ``rho = 0.95`` fixed. NUTS (Hoffman & Gelman
2014) samples ``(theta, q, r)`` under the Kalman marginal likelihood
(:class:`pssm.distributions.LinearGaussianStateSpace`); for each posterior draw a latent path
is then drawn from the exact conditional ``p(z | theta, q, r, w)`` by forward filtering,
backward sampling, so the exported ``InferenceData`` holds parameters and trajectories.

Run ``python -m examples.lgssm_nuts [--out DIR]`` (or ``python examples/lgssm_nuts.py``): prints
the ArviZ summary (94% HDIs, r_hat) next to the true values and saves a trace plot and a plot of
the latent trajectories into ``DIR`` (default ``runs/lgssm_nuts``).
"""

import argparse
import math
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS

from inference.arviz import az, from_mcmc
from pssm.distributions import LinearGaussianStateSpace

TRUE = {"theta": 0.3, "q_scale": 0.3, "r_scale": 0.5}
PARAMS = tuple(TRUE)
DECAY = 0.95


def lgssm(theta, q_scale, r_scale, num_steps: int, mask=None) -> LinearGaussianStateSpace:
    """The model's observation distribution for given parameters."""
    c, s = jnp.cos(theta), jnp.sin(theta)
    A = DECAY * jnp.stack([jnp.stack([c, -s]), jnp.stack([s, c])])
    eye = jnp.eye(2)
    return LinearGaussianStateSpace(
        initial_mean=jnp.zeros(2),
        initial_cov=eye,
        transition_matrix=A,
        transition_cov=q_scale**2 * eye,
        emission_cov=r_scale**2 * eye,
        num_steps=num_steps,
        mask=mask,
    )


def model(obs, mask=None):
    """Priors on ``(theta, q, r)``; the observations' site integrates the latent path out."""
    theta = numpyro.sample("theta", dist.Uniform(0.0, 0.5 * math.pi))
    q_scale = numpyro.sample("q_scale", dist.HalfNormal(1.0))
    r_scale = numpyro.sample("r_scale", dist.HalfNormal(1.0))
    numpyro.sample("obs", lgssm(theta, q_scale, r_scale, obs.shape[0], mask), obs=obs)


def simulate(key, num_steps: int, missing: float = 0.2):
    """Observations (NaN where missing), the observed-step mask and the true latent path."""
    key_sim, key_mask = jax.random.split(key)
    w, (z,) = lgssm(**TRUE, num_steps=num_steps).sample_with_intermediates(key_sim)
    mask = jax.random.uniform(key_mask, (num_steps,)) >= missing
    return jnp.where(mask[:, None], w, jnp.nan), mask, z


def run_nuts(key, obs, mask, *, num_warmup=500, num_samples=500, num_chains=4) -> MCMC:
    """NUTS with vectorized chains (one process, CPU friendly)."""
    mcmc = MCMC(
        NUTS(model),
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(key, obs, mask)
    return mcmc


def latent_sampler(obs, mask):
    """``latents(key, draw)``: one path from ``p(z | draw, obs)`` (FFBS), for the export."""

    def latents(key, draw):
        params = {name: draw[name] for name in PARAMS}
        z, _ = lgssm(**params, num_steps=obs.shape[0], mask=mask).posterior_sample(key, obs)
        return {"z": z}

    return latents


def export(key, mcmc: MCMC, obs, mask) -> az.InferenceData:
    """Parameters, sample stats, log-likelihood, observations and latent paths."""
    return from_mcmc(mcmc, latents=latent_sampler(obs, mask), key=key)


def summarize(idata: az.InferenceData):
    """ArviZ summary (94% HDI, r_hat) with the true values and whether the HDI covers them."""
    table = az.summary(idata, var_names=list(PARAMS), hdi_prob=0.94)
    table.insert(0, "true", [TRUE[name] for name in table.index])
    table["covered"] = (table["hdi_3%"] <= table["true"]) & (table["true"] <= table["hdi_97%"])
    return table


def plot(idata: az.InferenceData, obs, z_true, out: Path) -> list[Path]:
    """Trace plot of the parameters and the latent posterior against the true path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    lines = [(name, {}, [TRUE[name]]) for name in PARAMS]
    with warnings.catch_warnings():  # arviz 0.23 uses an API matplotlib 3.11 deprecates
        warnings.simplefilter("ignore", matplotlib.MatplotlibDeprecationWarning)
        axes = az.plot_trace(idata, var_names=list(PARAMS), lines=lines, compact=False)
    fig = axes.ravel()[0].figure
    fig.tight_layout()
    trace_path = out / "trace.png"
    fig.savefig(trace_path, dpi=100)
    plt.close(fig)

    z = idata.posterior["z"].stack(sample=("chain", "draw")).transpose("sample", ...).values
    lo, mid, hi = np.percentile(z, [3, 50, 97], axis=0)
    t = np.arange(z.shape[1])
    fig, axes = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    for i, ax in enumerate(axes):
        ax.fill_between(t, lo[:, i], hi[:, i], alpha=0.3, label="94% posterior band")
        ax.plot(t, mid[:, i], label="posterior median")
        ax.plot(t, np.asarray(z_true)[:, i], "k--", lw=1, label="true latent")
        ax.plot(t, np.asarray(obs)[:, i], ".", ms=3, color="gray", label="observation")
        ax.set_ylabel(f"z[{i}]")
    axes[0].legend(loc="upper right", fontsize=7)
    axes[-1].set_xlabel("time")
    fig.tight_layout()
    latent_path = out / "latents.png"
    fig.savefig(latent_path, dpi=100)
    plt.close(fig)
    return [trace_path, latent_path]


class Result(NamedTuple):
    """Everything :func:`main` computed, for inspection (and the tests)."""

    obs: jax.Array
    mask: jax.Array
    z_true: jax.Array
    mcmc: MCMC
    latent_key: jax.Array
    idata: az.InferenceData
    table: object  # pandas DataFrame
    plots: list[Path]


def main(argv=None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lgssm_nuts"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--missing", type=float, default=0.2)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    numpyro.enable_x64()

    key_sim, key_nuts, key_latent = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    obs, mask, z_true = simulate(key_sim, args.steps, args.missing)
    print(f"simulated T={args.steps} steps, {int(mask.sum())} observed")
    mcmc = run_nuts(
        key_nuts,
        obs,
        mask,
        num_warmup=args.warmup,
        num_samples=args.samples,
        num_chains=args.chains,
    )
    idata = export(key_latent, mcmc, obs, mask)
    table = summarize(idata)
    print(table.to_string())
    plots = plot(idata, obs, z_true, args.out)
    for path in plots:
        print(f"saved {path}")
    return Result(obs, mask, z_true, mcmc, key_latent, idata, table, plots)


if __name__ == "__main__":
    main()
