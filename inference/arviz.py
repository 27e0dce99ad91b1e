"""Export of NumPyro inference results (NUTS and SVI) to ArviZ ``InferenceData``.

Thin wrappers around :func:`arviz.from_numpyro` (MCMC) and :func:`arviz.from_dict` (SVI) that
add *latent trajectories* to the posterior group. In models that marginalise their latent path
(e.g. :class:`pssm.distributions.LinearGaussianStateSpace`) the path is no sample site; it is
drawn afterwards, one path per posterior draw of the parameters, from the exact conditional
``p(z_{0:T-1} | theta, o_{0:T-1})`` (forward filtering, backward sampling: Carter & Kohn 1994,
Frühwirth-Schnatter 1994). Latents are given either as arrays with one entry per draw or as a
function ``latents(key, draw) -> {name: array}`` of one draw (a dict of the posterior's sites),
which is mapped over all draws with independent keys (in chunks). Latent arrays get the dims
``("time", "latent")`` (or the first of them for ``(T,)`` arrays) unless ``dims`` names them.

This module is ``inference.arviz``; the library itself is imported absolutely, ``import arviz``.
"""

import warnings
from collections.abc import Callable, Mapping, Sequence
from math import prod

import jax
import numpy as np
import numpyro
from numpyro import handlers
from numpyro.infer import MCMC, Predictive

with warnings.catch_warnings():  # arviz 0.2x announces its 1.0 refactor on import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

LATENT_DIMS = ("time", "latent")

Latents = Mapping[str, jax.Array] | Callable[[jax.Array, dict], Mapping[str, jax.Array]]


def _draws(latents: Latents | None, key, samples: dict, shape: tuple[int, ...]) -> dict:
    """Latent arrays reshaped to ``shape + event`` (``shape`` = ``(chains, draws)``)."""
    if latents is None:
        return {}
    n = prod(shape)
    if callable(latents):
        if key is None:
            raise ValueError("a key is needed to draw latents from a function")
        flat = {k: np.reshape(v, (n, *np.shape(v)[len(shape) :])) for k, v in samples.items()}
        # chunks of 32 draws: bounded memory, and large vmapped batches of the dense Kalman
        # kernels were seen to hang XLA:CPU (jaxlib 0.10.2) at random
        fn = latents
        mapped = jax.jit(lambda *a: jax.lax.map(lambda x: fn(*x), a, batch_size=32))
        latents = mapped(jax.random.split(key, n), flat)
    out = {}
    for name, x in latents.items():
        x = np.asarray(x)
        if x.shape[: len(shape)] == shape:
            out[name] = x
        elif x.shape[:1] == (n,):
            out[name] = x.reshape(shape + x.shape[1:])
        else:
            raise ValueError(
                f"latent {name!r} has shape {x.shape}; expected a leading {shape} or ({n},)"
            )
    return out


def _latent_dims(arrays: dict, dims: Mapping | None, latent_dims: Sequence[str]) -> dict:
    dims = dict(dims or {})
    for name, x in arrays.items():
        event = x.ndim - 2
        if name not in dims and 0 < event <= len(latent_dims):
            dims[name] = list(latent_dims[:event])
    return dims


def from_mcmc(
    mcmc: MCMC,
    *,
    latents: Latents | None = None,
    key: jax.Array | None = None,
    coords: Mapping | None = None,
    dims: Mapping | None = None,
    latent_dims: Sequence[str] = LATENT_DIMS,
    log_likelihood: bool = True,
    **kwargs,
) -> az.InferenceData:
    """``InferenceData`` of a finished NumPyro ``MCMC`` run (e.g. NUTS), with latent paths.

    Groups as :func:`arviz.from_numpyro` makes them (``posterior``, ``sample_stats``,
    ``log_likelihood``, ``observed_data``, ...); the latents are added to ``posterior``.

    Args:
        mcmc: the run (after ``mcmc.run``).
        latents: ``{name: array}`` with a leading ``(chains, draws)`` or ``(chains * draws,)``
            axis, or a function ``latents(key, draw)`` of one draw (a dict of the sample sites)
            returning such arrays without the leading axis; it is ``vmap``-ed over all draws.
        key: PRNG key for a ``latents`` function (split into one key per draw).
        coords, dims: as in ArviZ; ``dims`` may also name the latents' dimensions.
        latent_dims: default dimension names of the latents' event axes.
        log_likelihood: compute the pointwise log-likelihood group.
        **kwargs: further arguments of :func:`arviz.from_numpyro`.
    """
    shape = (mcmc.num_chains, mcmc.num_samples // mcmc.thinning)
    extra = _draws(latents, key, mcmc.get_samples(group_by_chain=True), shape)
    # dims=None lets ArviZ name plate dimensions itself; the latents are added afterwards.
    idata = az.from_numpyro(mcmc, coords=coords, dims=dims, log_likelihood=log_likelihood, **kwargs)
    if extra:
        dims_all = _latent_dims(extra, dims, latent_dims)
        ds = az.dict_to_dataset(extra, library=numpyro, coords=coords, dims=dims_all)
        for name in ds.data_vars:
            idata.posterior[name] = ds[name]
    return idata


def _model_inputs(data) -> tuple[tuple, dict]:
    if data is None:
        return (), {}
    if isinstance(data, Mapping):
        return (), dict(data)
    return tuple(data), {}


def from_svi(
    model: Callable,
    guide: Callable,
    params: dict,
    data,
    num_samples: int,
    key: jax.Array,
    *,
    latents: Latents | None = None,
    coords: Mapping | None = None,
    dims: Mapping | None = None,
    latent_dims: Sequence[str] = LATENT_DIMS,
    log_likelihood: bool = True,
) -> az.InferenceData:
    """``InferenceData`` of ``num_samples`` draws from a fitted SVI guide, with latent paths.

    The posterior group holds the model's latent sample sites drawn from the guide (sites the
    guide does not cover, and the model's deterministic sites, are filled in by running the
    model on the guide's draws), as one chain; ``observed_data`` holds the model's observed
    sites and ``log_likelihood`` their log-densities per draw. Keys: ``key`` is split into
    ``(guide, model, latents)``; the guide is run as
    ``Predictive(guide, params=params, num_samples=num_samples)(guide_key, *args, **kwargs)``.

    Args:
        model, guide: the NumPyro model and guide (same signature).
        params: ``svi.get_params(state)`` (constrained values; model ``param`` sites included).
        data: the model's inputs: a dict of keyword arguments or a tuple of positional ones.
        num_samples: number of draws.
        key: PRNG key.
        latents, coords, dims, latent_dims, log_likelihood: as in :func:`from_mcmc`
            (``latents`` arrays have a leading ``(num_samples,)`` axis).
    """
    args, kwargs = _model_inputs(data)
    key_guide, key_model, key_latents = jax.random.split(key, 3)
    fitted = handlers.substitute(model, data=params)
    trace = handlers.trace(handlers.seed(fitted, key_model)).get_trace(*args, **kwargs)
    sample_sites = {k: s for k, s in trace.items() if s["type"] == "sample"}
    observed = {k: np.asarray(s["value"]) for k, s in sample_sites.items() if s["is_observed"]}
    hidden = [k for k, s in sample_sites.items() if not s["is_observed"]]
    deterministic = [k for k, s in trace.items() if s["type"] == "deterministic"]
    if not hidden:
        raise ValueError("the model has no latent sample sites: nothing to export as posterior")

    draws = Predictive(guide, params=params, num_samples=num_samples)(key_guide, *args, **kwargs)
    posterior = {k: draws[k] for k in hidden if k in draws}
    rest = [k for k in hidden + deterministic if k not in posterior]
    if rest:
        filled = Predictive(fitted, posterior_samples=posterior, return_sites=rest)(
            key_model, *args, **kwargs
        )
        posterior.update(filled)
    posterior = {k: np.asarray(v)[None] for k, v in posterior.items()}
    extra = _draws(latents, key_latents, posterior, (1, num_samples))
    posterior.update(extra)
    groups = {"posterior": posterior, "observed_data": observed or None}
    if log_likelihood and observed:
        ll = numpyro.infer.log_likelihood(
            fitted, {k: v[0] for k, v in posterior.items() if k in hidden}, *args, **kwargs
        )
        groups["log_likelihood"] = {k: np.asarray(v)[None] for k, v in ll.items()}
    dims_all = _latent_dims(extra, dims, latent_dims)
    return az.from_dict(**groups, coords=coords, dims=dims_all)
