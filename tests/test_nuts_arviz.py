"""NUTS on a small LGSSM (the ``examples.lgssm_nuts`` program, shrunk) converges and covers the
true parameters with its 94% HDIs; the ArviZ export holds exactly the source draws, the latent
paths (FFBS per draw) with dims ``("time", "latent")``, and the log-likelihood per draw."""

import jax
import numpy as np
import numpyro
import pytest
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from examples import lgssm_nuts as ex
from inference.arviz import az, from_mcmc, from_svi


def _check_recovery(idata, max_rhat=1.01):
    rhat = az.rhat(idata, var_names=list(ex.PARAMS))
    hdi = az.hdi(idata, var_names=list(ex.PARAMS), hdi_prob=0.94)
    for name, true in ex.TRUE.items():
        assert float(rhat[name]) <= max_rhat, (name, float(rhat[name]))
        lo, hi = hdi[name].values
        assert lo <= true <= hi, (name, lo, true, hi)
    assert int(idata.sample_stats["diverging"].sum()) == 0


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lgssm_nuts")
    argv = ["--steps", "50", "--warmup", "300", "--samples", "300", "--chains", "4"]
    return ex.main([*argv, "--seed", "0", "--out", str(out)])


def test_nuts_recovers_the_true_parameters(small_run):
    _check_recovery(small_run.idata)
    assert small_run.table["covered"].all()
    assert all(p.exists() and p.stat().st_size > 0 for p in small_run.plots)


def test_from_mcmc_holds_the_source_draws_and_latent_paths(small_run):
    r = small_run
    idata, T = r.idata, r.obs.shape[0]
    chains, draws = 4, 300
    assert {"posterior", "sample_stats", "log_likelihood", "observed_data"} <= set(idata.groups())
    samples = r.mcmc.get_samples(group_by_chain=True)
    for name in ex.PARAMS:
        assert idata.posterior[name].dims == ("chain", "draw")
        np.testing.assert_array_equal(idata.posterior[name].values, samples[name])
    z = idata.posterior["z"]
    assert z.dims == ("chain", "draw", "time", "latent") and z.shape == (chains, draws, T, 2)
    np.testing.assert_array_equal(idata.observed_data["obs"].values, r.obs)  # NaN where missing
    ll = idata.log_likelihood["obs"]
    assert ll.shape == (chains, draws)

    # draw (c, i) used key number c * draws + i; recompute a few paths and likelihoods
    keys = jax.random.split(r.latent_key, chains * draws)
    for c, i in ((0, 0), (1, 17), (3, draws - 1)):
        params = {name: samples[name][c, i] for name in ex.PARAMS}
        lgssm = ex.lgssm(**params, num_steps=T, mask=r.mask)
        path, _ = lgssm.posterior_sample(keys[c * draws + i], r.obs)
        np.testing.assert_allclose(z.values[c, i], path, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ll.values[c, i], lgssm.log_prob(r.obs), rtol=1e-10)

    # the latent posterior tracks the true path
    z_mean = z.mean(("chain", "draw")).values
    rmse = np.sqrt(np.mean((z_mean - np.asarray(r.z_true)) ** 2))
    assert rmse < 0.5 * np.std(np.asarray(r.z_true))


def test_from_mcmc_accepts_latent_arrays_and_rejects_bad_ones(small_run):
    r = small_run
    T, n = r.obs.shape[0], 4 * 300
    flat = np.arange(n * T, dtype=float).reshape(n, T)
    idata = from_mcmc(r.mcmc, latents={"level": flat}, log_likelihood=False)
    level = idata.posterior["level"]
    assert level.dims == ("chain", "draw", "time")
    np.testing.assert_array_equal(level.values, flat.reshape(4, 300, T))
    assert "log_likelihood" not in idata.groups()
    with pytest.raises(ValueError, match="leading"):
        from_mcmc(r.mcmc, latents={"level": flat[:-1]})
    with pytest.raises(ValueError, match="key"):
        from_mcmc(r.mcmc, latents=ex.latent_sampler(r.obs, r.mask))


def test_from_svi_holds_the_guide_draws_and_latent_paths(small_run):
    obs, mask = small_run.obs, small_run.mask
    T = obs.shape[0]
    guide = AutoNormal(ex.model)
    svi = SVI(ex.model, guide, numpyro.optim.Adam(0.05), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(1), 200, obs, mask, progress_bar=False)
    params = result.params
    key, n = jax.random.PRNGKey(2), 100
    idata = from_svi(
        ex.model, guide, params, (obs, mask), n, key, latents=ex.latent_sampler(obs, mask)
    )
    assert {"posterior", "log_likelihood", "observed_data"} <= set(idata.groups())
    key_guide, _, key_latents = jax.random.split(key, 3)
    draws = Predictive(guide, params=params, num_samples=n)(key_guide, obs, mask)
    for name in ex.PARAMS:
        assert idata.posterior[name].dims == ("chain", "draw")
        np.testing.assert_array_equal(idata.posterior[name].values[0], draws[name])
    z = idata.posterior["z"]
    assert z.dims == ("chain", "draw", "time", "latent") and z.shape == (1, n, T, 2)
    keys = jax.random.split(key_latents, n)
    ll = idata.log_likelihood["obs"].values[0]
    for i in (0, n - 1):
        lgssm = ex.lgssm(**{k: draws[k][i] for k in ex.PARAMS}, num_steps=T, mask=mask)
        np.testing.assert_allclose(z.values[0, i], lgssm.posterior_sample(keys[i], obs)[0])
        np.testing.assert_allclose(ll[i], lgssm.log_prob(obs), rtol=1e-10)
    np.testing.assert_array_equal(idata.observed_data["obs"].values, obs)
    # the fitted guide is a sensible posterior approximation: truth within 4 sd
    for name, true in ex.TRUE.items():
        x = idata.posterior[name].values
        assert abs(x.mean() - true) < 4 * x.std() + 0.02, name


@pytest.mark.slow
def test_nuts_recovers_the_true_parameters_long_run(tmp_path):
    argv = ["--steps", "200", "--warmup", "1000", "--samples", "1000", "--chains", "4"]
    run = ex.main([*argv, "--seed", "3", "--out", str(tmp_path)])
    _check_recovery(run.idata)
