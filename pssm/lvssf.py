"""L-VSSF: Variational State-Space Filters with linear dynamics ("Variational State-Space
Filters", Sec. 4 and 5.4, Pfrommer et al.; code: ``pfrommerd/variational_state_space_models``).

Linear-Gaussian latent dynamics with a fixed, time-invariant prior ``p(z_t) = N(0, Sigma_z)``
(the data's stationary distribution, paper Assumption 4.1)::

    z_0 ~ N(0, Sigma_z),   z_{t+1} = A z_t + B a_t + w_t,   w_t ~ N(0, Sigma_w)

``A, B, Sigma_w`` known or learned. Each step emits conditionally independent sensors (any
subset present, per step: masks ``(B, T, K)`` in the sensor order ``image, *linear``):

* image ``x_t`` (nonlinear, Sec. 4.1.1): ``x_t ~ N(dec(z_t), sigma_x^2 I)``; its inference
  model in information form is

      q(z_t | x_t) = N_info(Lambda mu(x_t),  Lambda + Sigma_z^{-1}),
      Lambda = (L L^T + eps I)^{-1}                                     (paper Sec. 5.4)

  with ``mu = enc(x_t)`` (bounded by ``mean_bound``) and a learned global matrix ``L``, so that
  ``q(z_t | x_t) / p(z_t) ∝ N_info(Lambda mu, Lambda)`` is a valid density: a latent
  pseudo-observation ``mu_t = z_t + N(0, L L^T + eps I)``.
* linear sensors ``y_t^(j) = C_j z_t + N(0, Sigma_j)`` (Sec. 4.1.2), e.g. the pendulum angle
  ``C = [1, 0]`` for partial supervision. Its posterior is exact, contributing
  ``C_j^T Sigma_j^{-1} C_j`` and ``C_j^T Sigma_j^{-1} y`` in information form.

The filter (paper Eq. 6-7) fuses the sensors present at a step by adding their precisions
and information vectors to the predicted belief's: exactly the Kalman filter of the latent
LGSSM ``model.structure`` returns (``inference.kalman`` stacks the sensors and adds their
information). The guide is ``inference.guides.backward_sampling``:
``q(z_{T-1} | o) prod_t q(z_t | z_{t+1}, o_{0:t})`` (Eq. 4-5, Theorem 3). The paper trains it with a
Monte Carlo KL of the whole path from many backward samples and the reconstruction from one
(:func:`path_kl_elbo`, :class:`PathKLELBO`); the model is time-invariant, so a filter trained on
length-5 sequences runs on sequences of any length (:func:`filter_beliefs`).

Time and batch conventions in :mod:`pssm.core`; observed sites ``"obs_image"`` and
``"obs_<sensor>"``.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from flax import nnx
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.infer.elbo import ELBO

from inference import kalman

from . import nets
from .core import Structure, linear_gaussian, sample_latent_path
from .locally_linear import Inputs, observation_sites, prepare_inputs

IMAGE = "image"
_LEARNABLE = ("A", "B", "Sigma_w")


def _matrix(name, x, shape=None) -> jnp.ndarray:
    x = jnp.asarray(x, dtype=nets.default_param_dtype())
    if x.ndim != 2 or (shape is not None and x.shape != shape):
        raise ValueError(f"{name} has shape {x.shape}, expected {shape or '(rows, cols)'}")
    return x


def _check_covariance(name, x) -> None:
    v = np.asarray(x, dtype=np.float64)
    if not np.allclose(v, v.T) or np.any(np.linalg.eigvalsh(v) <= 0):
        raise ValueError(f"{name} must be symmetric positive definite")


def lvssf(
    image_dim: int,
    *,
    A,
    prior_cov,
    Sigma_w,
    B=None,
    linear_sensors: Mapping[str, object] | None = None,
    linear_noise: float | Mapping[str, object] = 0.05,
    learn: Sequence[str] = (),
    hidden: int | Sequence[int] = (128, 128),
    decoder_var: float = 0.01,
    init_L: float = 0.1,
    min_cov: float = 1e-3,
    mean_bound: float = 10.0,
    name: str = "lvssf",
    seed: int = 0,
):
    """Build an L-VSSF model (equations in the module docstring).

    Args:
        image_dim: pixels per (flattened) image ``p``.
        A: ``(d, d)`` transition matrix (the initial value when learned).
        prior_cov: ``(d, d)`` fixed prior covariance ``Sigma_z`` of every ``z_t``.
        Sigma_w: ``(d, d)`` transition noise covariance.
        B: ``(d, u)`` control matrix, or ``None`` for a model without actions.
        linear_sensors: ``{name: C_j}`` with ``C_j`` of shape ``(p_j, d)``.
        linear_noise: ``Sigma_j`` as a variance (``v I``) or a ``(p_j, p_j)`` matrix, one for
            all sensors or a dict per sensor (paper: ``0.05 I``).
        learn: any of ``"A", "B", "Sigma_w"`` (parameter sites ``"<name>_A"``, ...).
        hidden: widths of the encoder's and decoder's hidden layers (GELU MLPs).
        decoder_var: the image likelihood's fixed variance ``sigma_x^2`` per pixel.
        init_L, min_cov: ``L`` starts at ``init_L * I``; ``eps = min_cov`` (covariance floor of
            the pseudo-observation, so ``Lambda <= I / eps``).
        mean_bound: the encoder mean is ``mean_bound * tanh(net(x) / mean_bound)``.
        name: prefix of the parameter sites (``"<name>_encoder$params"``,
            ``"<name>_decoder$params"``, ``"<name>_L"``, ``"<name>_A"``, ...).
        seed: initialisation of the network weights.

    Returns:
        ``model(obs, actions=None, mask=None)`` with ``obs = {"image": (B, T, p), sensor:
        (B, T, p_j), ...}`` and ``mask`` ``(B, T)`` or ``(B, T, K)`` (sensor order
        ``model.sensors``), latent sites ``"z_0"``, ``"z"``; it carries ``model.structure``
        (for ``backward_sampling``), ``model.image_posterior`` (``q(z | x)`` in information
        form), ``model.sensors``, ``model.latent_dim``, ``model.action_dim`` and
        ``model.prior_cov``.
    """
    learn = set(learn)
    if learn - set(_LEARNABLE):
        raise ValueError(f"learn must be a subset of {_LEARNABLE}, got {sorted(learn)}")
    A0 = _matrix("A", A)
    d = A0.shape[0]
    A0 = _matrix("A", A0, (d, d))
    P0 = _matrix("prior_cov", prior_cov, (d, d))
    Q0 = _matrix("Sigma_w", Sigma_w, (d, d))
    _check_covariance("prior_cov", P0)
    _check_covariance("Sigma_w", Q0)
    B0 = None if B is None else _matrix("B", B)
    if B0 is not None and B0.shape[0] != d:
        raise ValueError(f"B has shape {B0.shape}, expected ({d}, action_dim)")
    if "B" in learn and B0 is None:
        raise ValueError("learn contains 'B' but the model has no control matrix B")
    u = 0 if B0 is None else B0.shape[1]
    linear_sensors = dict(linear_sensors or {})
    if IMAGE in linear_sensors:
        raise ValueError(f"{IMAGE!r} is the image sensor's name; rename the linear sensor")
    Cs, noises = {}, {}
    for k, C in linear_sensors.items():
        C = _matrix(f"linear_sensors[{k!r}]", C)
        if C.shape[1] != d:
            raise ValueError(f"linear_sensors[{k!r}] has shape {C.shape}, expected (p, {d})")
        v = linear_noise[k] if isinstance(linear_noise, Mapping) else linear_noise
        R = v * jnp.eye(C.shape[0], dtype=C.dtype) if np.ndim(v) == 0 else _matrix("noise", v)
        if R.shape != (C.shape[0],) * 2:
            raise ValueError(f"linear_noise for {k!r} has shape {R.shape}, expected {C.shape[0]}")
        _check_covariance(f"linear_noise[{k!r}]", R)
        Cs[k], noises[k] = C, R
    if not (init_L > 0 and min_cov > 0 and mean_bound > 0 and decoder_var > 0):
        raise ValueError("init_L, min_cov, mean_bound and decoder_var must be positive")
    dims = {IMAGE: int(image_dim), **{k: C.shape[0] for k, C in Cs.items()}}
    sites = observation_sites(dims)
    widths = (int(hidden),) if isinstance(hidden, int) else tuple(int(h) for h in hidden)
    rngs = nnx.Rngs(seed)
    encoder = nets.MLP(image_dim, widths, d, activation=nnx.gelu, rngs=rngs)
    decoder = nets.MLP(d, widths, image_dim, activation=nnx.gelu, rngs=rngs)
    eye = jnp.eye(d, dtype=P0.dtype)

    def dynamics():
        A_ = numpyro.param(f"{name}_A", A0) if "A" in learn else A0
        B_ = numpyro.param(f"{name}_B", B0) if "B" in learn else B0
        Q_ = Q0
        if "Sigma_w" in learn:
            Q_ = numpyro.param(f"{name}_Sigma_w", Q0, constraint=constraints.positive_definite)
        return A_, B_, Q_

    def prior_chain(x: Inputs) -> tuple[kalman.Gaussian, kalman.Dynamics]:
        n, T = x.mask.shape[:2]
        A_, B_, Q_ = dynamics()
        b = jnp.zeros((n, T - 1, d), P0.dtype)
        if u:
            b = jnp.einsum("du,ntu->ntd", B_, x.actions[:, :-1])
        tv = lambda M: jnp.broadcast_to(M, (n, T - 1, d, d))
        prior = kalman.Gaussian(jnp.zeros((n, d), P0.dtype), jnp.broadcast_to(P0, (n, d, d)))
        return prior, kalman.Dynamics(tv(A_), b, tv(Q_))

    def pseudo_observation(images):
        """``(mu, L L^T + eps I)``: ``q(z | x) / p(z)`` as a latent observation of ``z``."""
        raw = nets.register(f"{name}_encoder", encoder)(images)
        mu = mean_bound * jnp.tanh(raw / mean_bound)
        L = numpyro.param(f"{name}_L", init_L * eye)
        return mu, L @ L.T + min_cov * eye

    def image_posterior(images):
        """``q(z_t | x_t)`` in information form: ``(eta, J) = (Lambda mu, Lambda + Sigma_z^-1)``
        with ``eta`` of shape ``(..., d)`` and ``J`` ``(d, d)``."""
        mu, R = pseudo_observation(images)
        Lam = jnp.linalg.inv(R)
        return jnp.einsum("ij,...j->...i", Lam, mu), Lam + jnp.linalg.inv(P0)

    def emissions(x: Inputs) -> kalman.Emissions:
        mu, R_img = pseudo_observation(x.obs[IMAGE])

        def one(mu_s, ys, m):
            sensors = [kalman.Emissions(mu_s, R_img, m[:, 0], eye)]
            for j, (k, y) in enumerate(ys.items(), start=1):
                sensors.append(kalman.Emissions(y, noises[k], m[:, j], Cs[k]))
            return kalman.stack_sensors(sensors)

        ys = {k: x.obs[k] for k in Cs}
        return jax.vmap(one)(mu, ys, x.mask.astype(mu.dtype))

    def inputs(obs, actions, mask) -> Inputs:
        if u and actions is None:
            raise ValueError(f"this model has a control matrix B: pass actions (B, T, {u})")
        return prepare_inputs(dims, u, obs, actions if u else None, mask)

    def structure(obs, actions=None, mask=None) -> Structure:
        x = inputs(obs, actions, mask)
        prior, dyn = prior_chain(x)
        return Structure(prior, dyn, emissions(x))

    @linear_gaussian(structure)
    def model(obs, actions=None, mask=None):
        x = inputs(obs, actions, mask)
        z = sample_latent_path(*prior_chain(x))
        for j, (k, y) in enumerate(x.obs.items()):
            if k == IMAGE:
                mean = nets.register(f"{name}_decoder", decoder)(z)
                likelihood = dist.Normal(mean, np.sqrt(decoder_var)).to_event(1)
            else:
                mean = jnp.einsum("pd,ntd->ntp", Cs[k], z)
                likelihood = dist.MultivariateNormal(mean, covariance_matrix=noises[k])
            with numpyro.plate("batch", y.shape[0]):
                numpyro.sample(sites[k], likelihood.mask(x.mask[..., j]).to_event(1), obs=y)
        return z

    model.image_posterior = image_posterior
    model.sensors = tuple(dims)
    model.latent_dim, model.action_dim, model.prior_cov = d, u, P0
    return model


def filter_beliefs(model, params: dict, obs, actions=None, mask=None) -> kalman.FilterResult:
    """The L-VSSF filter ``q(z_t | o_{0:t})`` of every sequence (leading batch axis), with the
    model's parameters substituted from ``params`` (constrained values, e.g.
    ``objective.constrain(state.params)``). Works for any sequence length and sensor mask."""
    with handlers.block(), handlers.substitute(data=params):
        s = model.structure(obs, actions, mask)
    return jax.vmap(kalman.filter)(*s)


def image_posterior(model, params: dict, images) -> tuple[jax.Array, jax.Array]:
    """``q(z | x)`` of the image encoder in information form ``(eta, J)`` at ``params``."""
    with handlers.block(), handlers.substitute(data=params):
        return model.image_posterior(images)


# --- the paper's objective: Monte Carlo KL of the whole path -----------------------------------


def _log_prob(site) -> jax.Array:
    fn, value = site["fn"], site["value"]
    lp = fn.log_prob(value, site["intermediates"]) if site["intermediates"] else fn.log_prob(value)
    if site["scale"] is not None:
        lp = site["scale"] * lp
    return jnp.sum(lp)


def _latent_sites(tr) -> list[str]:
    return [n for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]]


def path_kl_elbo(
    key: jax.Array, params: dict, model, guide, *args, num_kl_samples: int = 64, **kwargs
) -> tuple[jax.Array, dict]:
    """The VSSF objective (paper Eq. 3 as its code estimates it): ``loss = -(recon - KL)`` with

        KL    = 1/N sum_n [log q(z^n_{0:T-1} | o) - log p(z^n_{0:T-1} | a)],   z^n ~ q,
        recon = log p(o | z^1_{0:T-1})                     (one of the same N paths),

    for any NumPyro ``model`` and ``guide`` (here ``backward_sampling(model)``): ``log q`` sums
    the guide's sample sites, ``log p`` the model's sites of the same names (the latent
    path), ``recon`` the model's other (observed) sites. Many paths reduce the variance of the
    KL for the price of cheap Kalman samples; the decoder runs once. With ``N = 1`` this is
    one particle of ``Trace_ELBO``. Sums over the batch like NumPyro's ELBOs.

    Args:
        key: PRNG key.
        params: constrained parameter values by site name.
        model, guide: NumPyro programs sharing the latent sites.
        *args, **kwargs: their arguments (data).
        num_kl_samples: ``N``.

    Returns:
        ``(loss, metrics)`` with metrics ``elbo``, ``recon``, ``kl`` and ``kl_se`` (Monte Carlo
        standard error of ``KL``).
    """
    if num_kl_samples < 1:
        raise ValueError(f"num_kl_samples must be >= 1, got {num_kl_samples}")
    guide_key, model_key = jax.random.split(key)
    guide_ = handlers.substitute(guide, data=params)
    model_ = handlers.substitute(model, data=params)

    def draw(k):
        tr = handlers.trace(handlers.seed(guide_, k)).get_trace(*args, **kwargs)
        latent = {n: tr[n]["value"] for n in _latent_sites(tr)}
        if not latent:
            raise ValueError("the guide samples no latent sites")
        return latent, sum((_log_prob(tr[n]) for n in latent), jnp.zeros(()))

    def model_trace(latent):
        conditioned = handlers.condition(handlers.seed(model_, model_key), data=latent)
        tr = handlers.trace(conditioned).get_trace(*args, **kwargs)
        missing = [n for n in latent if n not in tr]
        model_only = _latent_sites(tr)
        if missing or model_only:
            raise ValueError(
                f"guide and model must share their latent sites: guide-only {missing}, "
                f"model-only {model_only}"
            )
        return tr

    latents, log_q = jax.vmap(draw)(jax.random.split(guide_key, num_kl_samples))
    # only the latent sites' densities leave the vmapped trace: under jit the batched decoder
    # is dead code and removed
    log_p = jax.vmap(lambda z: sum(_log_prob(s) for n, s in model_trace(z).items() if n in z))(
        latents
    )
    first = jax.tree.map(lambda x: x[0], latents)
    tr = model_trace(first)
    observed = [n for n, s in tr.items() if s["type"] == "sample" and n not in first]
    recon = sum((_log_prob(tr[n]) for n in observed), jnp.zeros(()))
    diff = log_q - log_p
    kl = jnp.mean(diff)
    se = jnp.std(diff) / np.sqrt(num_kl_samples) if num_kl_samples > 1 else jnp.zeros(())
    elbo = recon - kl
    return -elbo, {"elbo": elbo, "recon": recon, "kl": kl, "kl_se": se}


class PathKLELBO(ELBO):
    """:func:`path_kl_elbo` as a NumPyro ELBO reporting metrics (the
    ``inference.training.MetricsELBO`` protocol), for ``training.elbo_objective`` / ``fit``.

    Args:
        num_kl_samples: backward-sampled paths for the KL (the official code uses 1024).
    """

    def __init__(self, num_kl_samples: int = 64):
        if num_kl_samples < 1:
            raise ValueError(f"num_kl_samples must be >= 1, got {num_kl_samples}")
        super().__init__(num_particles=1)
        self.num_kl_samples = int(num_kl_samples)

    def loss_with_metrics(self, rng_key, param_map, model, guide, *args, **kwargs) -> dict:
        loss, metrics = path_kl_elbo(
            rng_key, param_map, model, guide, *args, num_kl_samples=self.num_kl_samples, **kwargs
        )
        return {"loss": loss, "metrics": metrics, "mutable_state": None}

    def loss(self, rng_key, param_map, model, guide, *args, **kwargs):
        return self.loss_with_metrics(rng_key, param_map, model, guide, *args, **kwargs)["loss"]
