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
(:func:`inference.objectives.path_kl_elbo`, :class:`inference.objectives.PathKLELBO`); the
model is time-invariant, so a filter trained on length-5 sequences runs on sequences of any
length (:func:`filter_beliefs`).

**Vector sensors and acting.** The nonlinear sensor need not be an image: ``obs_dims`` (one
vector, or ``{modality: p_k}``, e.g. dm_control states) gives each modality ``k`` its own
encoder ``mu_k`` and matrix ``L_k``, the same information form ``N_info(Lambda_k mu_k(x),
Lambda_k)`` (the paper's "nonlinear sensing modality j", Sec. 4.1.1), fused with the others by
adding information. ``reward=True`` adds a head ``rew_t ~ N(head(z_{t+1}), 1)``. The belief step
(:mod:`pssm.belief`, ``model.belief_step()``) is the dense Kalman filter of the latent LGSSM,
one step at a time: ``condition`` is :func:`inference.kalman.update` on the step's stacked
sensors, ``predict`` is :func:`inference.kalman.predict` through ``z' = A z + B a + w``. The
sensors of a step and the dynamics of an action come from the same two functions for the
belief step and for ``model.structure`` (whose sequential Kalman filter scans those very
``update`` / ``predict``), so :func:`filter_beliefs` and the online filter are one
implementation.

Time and batch conventions in :mod:`pssm.core`; observed sites ``"obs_image"`` and
``"obs_<sensor>"``.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from flax import nnx
from numpyro import handlers
from numpyro.distributions import constraints

from inference import kalman

from . import nets
from .belief import BeliefStep
from .core import Structure, linear_gaussian, sample_latent_path
from .inputs import Inputs, modalities, observation_sites, prepare_inputs
from .observations import step_observations
from .rssm import score_rewards

IMAGE = "image"
_LEARNABLE = ("A", "B", "Sigma_w")

__all__ = ["IMAGE", "Networks", "filter_beliefs", "image_posterior", "lvssf"]


def _matrix(name, x, shape=None) -> jnp.ndarray:
    x = jnp.asarray(x, dtype=nets.default_param_dtype())
    if x.ndim != 2 or (shape is not None and x.shape != shape):
        raise ValueError(f"{name} has shape {x.shape}, expected {shape or '(rows, cols)'}")
    return x


def _check_covariance(name, x) -> None:
    v = np.asarray(x, dtype=np.float64)
    if not np.allclose(v, v.T) or np.any(np.linalg.eigvalsh(v) <= 0):
        raise ValueError(f"{name} must be symmetric positive definite")


class Networks(NamedTuple):
    """An L-VSSF's parameters as registered (or substituted) values and pure functions.

    Attributes:
        encoders: ``{nonlinear sensor: x (..., p_k) -> mu (..., d)}`` (bounded means).
        pseudo_cov: ``{nonlinear sensor: L_k L_k^T + eps I}`` ``(d, d)``, the covariance of the
            pseudo-observation ``mu_k = z + N(0, Lambda_k^-1)``.
        decoders: ``{nonlinear sensor: z (..., d) -> mean (..., p_k)}``.
        reward: ``z (..., d) -> (...)`` or ``None`` without a reward head.
        A, B, Q: the dynamics ``z' = A z + B a + N(0, Q)`` (``B`` ``None`` without actions).
    """

    encoders: dict[str, Callable]
    pseudo_cov: dict[str, jax.Array]
    decoders: dict[str, Callable]
    reward: Callable | None
    A: jax.Array
    B: jax.Array | None
    Q: jax.Array


def lvssf(
    image_dim: int | None = None,
    *,
    A,
    prior_cov,
    Sigma_w,
    B=None,
    obs_dims: int | Mapping[str, int] | None = None,
    linear_sensors: Mapping[str, object] | None = None,
    linear_noise: float | Mapping[str, object] = 0.05,
    learn: Sequence[str] = (),
    hidden: int | Sequence[int] = (128, 128),
    decoder_var: float = 0.01,
    init_L: float = 0.1,
    min_cov: float = 1e-3,
    mean_bound: float = 10.0,
    reward: bool = False,
    name: str = "lvssf",
    seed: int = 0,
):
    """Build an L-VSSF model (equations in the module docstring).

    Args:
        image_dim: pixels per (flattened) image ``p``: one nonlinear sensor named ``"image"``
            (``obs`` a dict). Give either this or ``obs_dims``.
        A: ``(d, d)`` transition matrix (the initial value when learned).
        prior_cov: ``(d, d)`` fixed prior covariance ``Sigma_z`` of every ``z_t``.
        Sigma_w: ``(d, d)`` transition noise covariance.
        B: ``(d, u)`` control matrix, or ``None`` for a model without actions.
        obs_dims: the nonlinear vector sensors instead of an image: one size ``p`` (``obs`` is
            then an array ``(B, T, p)``, site ``"obs"``) or ``{modality: p_k}`` (``obs`` a dict,
            sites ``"obs_<modality>"``), each with its own MLP encoder, decoder and ``L_k``.
        linear_sensors: ``{name: C_j}`` with ``C_j`` of shape ``(p_j, d)`` (needs ``obs`` to be
            a dict: an image or a mapping ``obs_dims``).
        linear_noise: ``Sigma_j`` as a variance (``v I``) or a ``(p_j, p_j)`` matrix, one for
            all sensors or a dict per sensor (paper: ``0.05 I``).
        learn: any of ``"A", "B", "Sigma_w"`` (parameter sites ``"<name>_A"``, ...).
        hidden: widths of the encoders' and decoders' hidden layers (GELU MLPs) and the reward
            head's.
        decoder_var: the nonlinear sensors' fixed likelihood variance ``sigma_x^2`` per entry.
        init_L, min_cov: ``L`` starts at ``init_L * I``; ``eps = min_cov`` (covariance floor of
            the pseudo-observation, so ``Lambda <= I / eps``).
        mean_bound: the encoder mean is ``mean_bound * tanh(net(x) / mean_bound)``.
        reward: add a reward head; the model then scores ``rewards[:, t]`` against ``z_{t+1}``
            (:func:`pssm.rssm.score_rewards`).
        name: prefix of the parameter sites (``"<name>_encoder$params"``,
            ``"<name>_decoder$params"``, ``"<name>_L"`` for a single nonlinear sensor, with a
            suffix ``"_<modality>"`` for several; ``"<name>_reward$params"``, ``"<name>_A"``,
            ...).
        seed: initialisation of the network weights.

    Returns:
        ``model(obs, actions=None, mask=None, rewards=None)`` with ``obs = {"image": (B, T, p),
        sensor: (B, T, p_j), ...}`` (or as ``obs_dims`` says) and ``mask`` ``(B, T)`` or ``(B, T,
        K)`` (sensor order ``model.sensors``: nonlinear sensors, then linear ones), latent sites
        ``"z_0"``, ``"z"``; it carries ``model.structure`` (for ``backward_sampling``),
        ``model.filter`` (the filter's :class:`inference.kalman.FilterResult`),
        ``model.belief_step()`` (:mod:`pssm.belief`), ``model.networks()``,
        ``model.image_posterior`` (``q(z | x)`` of the first nonlinear sensor in information
        form), ``model.sensors``, ``model.latent_dim``, ``model.feature_size`` (``d``: the
        features are the belief mean), ``model.action_dim`` and ``model.prior_cov``.
    """
    if (image_dim is None) == (obs_dims is None):
        raise ValueError("give exactly one of image_dim (an image sensor) and obs_dims")
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
    nonlinear = {IMAGE: int(image_dim)} if image_dim is not None else modalities(obs_dims)
    if not all(isinstance(p, int) for p in nonlinear.values()):
        raise ValueError(f"the nonlinear sensors take flat vectors, got shapes {nonlinear}")
    one_array = obs_dims is not None and not isinstance(obs_dims, Mapping)
    linear_sensors = dict(linear_sensors or {})
    if linear_sensors and one_array:
        raise ValueError("linear sensors need obs as a dict: give obs_dims as {modality: p}")
    Cs, noises = {}, {}
    for k, C in linear_sensors.items():
        if k in nonlinear:
            raise ValueError(f"{k!r} is a nonlinear sensor's name; rename the linear sensor")
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
    dims = {**nonlinear, **{k: C.shape[0] for k, C in Cs.items()}}
    spec = nonlinear["obs"] if one_array else dims  # what prepare_inputs and the sites read
    sites = observation_sites(spec)
    names = list(dims)
    widths = (int(hidden),) if isinstance(hidden, int) else tuple(int(h) for h in hidden)
    rngs = nnx.Rngs(seed)
    encoders, decoders = {}, {}
    for k, p in nonlinear.items():
        encoders[k] = nets.MLP(p, widths, d, activation=nnx.gelu, rngs=rngs)
        decoders[k] = nets.MLP(d, widths, p, activation=nnx.gelu, rngs=rngs)
    reward_head = nets.MLP(d, widths, 1, activation=nnx.gelu, rngs=rngs) if reward else None
    suffix = (lambda k: "") if len(nonlinear) == 1 else (lambda k: f"_{k}")
    eye = jnp.eye(d, dtype=P0.dtype)

    def networks() -> Networks:
        """Register every parameter site (inside the caller's handlers) and return them."""
        enc, cov, dec = {}, {}, {}
        for k in nonlinear:
            net = nets.register(f"{name}_encoder{suffix(k)}", encoders[k])
            enc[k] = lambda x, net=net: mean_bound * jnp.tanh(net(x) / mean_bound)
            L = numpyro.param(f"{name}_L{suffix(k)}", init_L * eye)
            cov[k] = L @ L.T + min_cov * eye
            dec[k] = nets.register(f"{name}_decoder{suffix(k)}", decoders[k])
        head = None
        if reward_head is not None:
            head_fn = nets.register(f"{name}_reward", reward_head)
            head = lambda z: head_fn(z)[..., 0]
        A_ = numpyro.param(f"{name}_A", A0) if "A" in learn else A0
        B_ = numpyro.param(f"{name}_B", B0) if "B" in learn else B0
        Q_ = Q0
        if "Sigma_w" in learn:
            Q_ = numpyro.param(f"{name}_Sigma_w", Q0, constraint=constraints.positive_definite)
        return Networks(enc, cov, dec, head, A_, B_, Q_)

    def sensor_emissions(n: Networks, obs: Mapping, mask) -> kalman.Emissions:
        """The dense emissions of the sensors ``obs`` ``{k: (..., p_k)}`` with ``mask``
        ``(..., K)``: the pseudo-observations ``mu_k = z + N(0, L_k L_k^T + eps I)`` of the
        nonlinear sensors and ``y_j = C_j z + N(0, Sigma_j)`` of the linear ones, stacked
        (block-diagonal ``R``, per-row mask), each leaf with the leading axes ``(...)``. One
        step of an online filter (leading ``(B,)``) or whole sequences (``(B, T)``)."""
        lead = jnp.shape(mask)[:-1]
        flat = lambda x: jnp.reshape(x, (-1, *jnp.shape(x)[len(lead) :]))
        m = flat(jnp.asarray(mask).astype(P0.dtype))
        sensors = []
        for j, k in enumerate(names):
            if k in nonlinear:
                mu = flat(n.encoders[k](obs[k]))
                sensors.append(kalman.Emissions(mu, n.pseudo_cov[k], m[:, j], eye))
            else:
                sensors.append(kalman.Emissions(flat(obs[k]), noises[k], m[:, j], Cs[k]))
        stacked = kalman.stack_sensors(sensors)
        return jax.tree.map(lambda x: jnp.reshape(x, (*lead, *x.shape[1:])), stacked)

    def transition(n: Networks, actions) -> kalman.Dynamics:
        """``(A, B a, Sigma_w)`` for actions ``(..., u)`` (``b = 0`` without actions), ``A`` and
        ``Q`` broadcast to the leading axes of ``actions``."""
        lead = jnp.shape(actions)[:-1]
        b = jnp.zeros((*lead, d), P0.dtype) if not u else jnp.einsum("du,...u->...d", n.B, actions)
        tv = lambda M: jnp.broadcast_to(M, (*lead, d, d))
        return kalman.Dynamics(tv(n.A), b, tv(n.Q))

    def initial(batch_size: int) -> kalman.Gaussian:
        """The time-invariant prior ``N(0, Sigma_z)`` of ``z_0``, batched."""
        return kalman.Gaussian(
            jnp.zeros((batch_size, d), P0.dtype), jnp.broadcast_to(P0, (batch_size, d, d))
        )

    def inputs(obs, actions, mask) -> Inputs:
        if u and actions is None:
            raise ValueError(f"this model has a control matrix B: pass actions (B, T, {u})")
        return prepare_inputs(spec, u, obs, actions if u else None, mask)

    def chain(x: Inputs, n: Networks) -> tuple[kalman.Gaussian, kalman.Dynamics]:
        B_, T = x.mask.shape[:2]
        actions = jnp.zeros((B_, T, 0), P0.dtype) if x.actions is None else x.actions
        return initial(B_), transition(n, actions[:, :-1].astype(P0.dtype))

    def structure_of(x: Inputs, n: Networks) -> Structure:
        return Structure(*chain(x, n), sensor_emissions(n, x.obs, x.mask))

    def structure(obs, actions=None, mask=None) -> Structure:
        return structure_of(inputs(obs, actions, mask), networks())

    def filter_result(obs, actions=None, mask=None) -> kalman.FilterResult:
        """The sequential Kalman filter of every sequence (it scans ``kalman.predict`` and
        ``kalman.update``, the belief step's functions)."""
        return jax.vmap(kalman.filter)(*structure(obs, actions, mask))

    def image_posterior(images, sensor: str | None = None):
        """``q(z_t | x_t)`` in information form: ``(eta, J) = (Lambda mu, Lambda + Sigma_z^-1)``
        with ``eta`` of shape ``(..., d)`` and ``J`` ``(d, d)``, of the nonlinear sensor
        ``sensor`` (default: the first, e.g. ``"image"``)."""
        k = names[0] if sensor is None else sensor
        n = networks()
        Lam = jnp.linalg.inv(n.pseudo_cov[k])
        return jnp.einsum("ij,...j->...i", Lam, n.encoders[k](images)), Lam + jnp.linalg.inv(P0)

    def belief_step() -> BeliefStep:
        """The online filter (:mod:`pssm.belief`): the belief is the filtered ``N(m, P)``
        (``(B, d)``, ``(B, d, d)``); ``condition`` is :func:`inference.kalman.update` on the
        step's stacked sensors, ``predict`` :func:`inference.kalman.predict` through ``z' = A z
        + B a + w`` (no sampling), features the mean; ``filter`` the model's Kalman filter."""
        n = networks()

        def condition(belief, obs, mask, key):
            del key
            obs, seen = step_observations(obs, mask, names)
            obs = {k: o.astype(P0.dtype) for k, o in obs.items()}
            e = sensor_emissions(n, obs, seen)
            return jax.vmap(lambda b, w, R, m, H: kalman.update(b, w, R, m, H)[0])(belief, *e)

        def predict(belief, action, key):
            del key
            a = jnp.asarray(action, P0.dtype).reshape(belief.mean.shape[0], u)
            return jax.vmap(kalman.predict)(belief, transition(n, a))

        def decode(f):
            out = {k: n.decoders[k](f) for k in nonlinear}
            out |= {k: jnp.einsum("pd,...d->...p", C, f) for k, C in Cs.items()}
            return out["obs"] if one_array else out

        def filter_sequence(obs, actions, mask, key):
            del key
            x = inputs(obs, actions, mask)
            return jax.vmap(kalman.filter)(*structure_of(x, n)).filtered

        return BeliefStep(
            initial, condition, predict, lambda b: b.mean, n.reward, decode, filter_sequence
        )

    @linear_gaussian(structure)
    def model(obs, actions=None, mask=None, rewards=None):
        x = inputs(obs, actions, mask)
        n = networks()
        z = sample_latent_path(*chain(x, n))
        for j, (k, y) in enumerate(x.obs.items()):
            if k in nonlinear:
                likelihood = dist.Normal(n.decoders[k](z), np.sqrt(decoder_var)).to_event(1)
            else:
                mean = jnp.einsum("pd,ntd->ntp", Cs[k], z)
                likelihood = dist.MultivariateNormal(mean, covariance_matrix=noises[k])
            with numpyro.plate("batch", y.shape[0]):
                numpyro.sample(sites[k], likelihood.mask(x.mask[..., j]).to_event(1), obs=y)
        if rewards is not None:
            if n.reward is None:
                raise ValueError("this L-VSSF has no reward head: build it with reward=True")
            score_rewards(rewards, z, lambda f: n.reward(f)[..., None])
        return z

    model.image_posterior = image_posterior
    model.filter, model.networks, model.belief_step = filter_result, networks, belief_step
    model.sensors = tuple(dims)
    model.latent_dim = model.feature_size = d
    model.action_dim, model.prior_cov = u, P0
    model.obs_dims = dims
    return model


def filter_beliefs(model, params: dict, obs, actions=None, mask=None) -> kalman.FilterResult:
    """The L-VSSF filter ``q(z_t | o_{0:t})`` of every sequence (leading batch axis), with the
    model's parameters substituted from ``params`` (constrained values, e.g.
    ``objective.constrain(state.params)``). Works for any sequence length and sensor mask.
    ``model.filter``: the same Kalman steps as the belief step's ``condition`` / ``predict``."""
    with handlers.block(), handlers.substitute(data=params):
        return model.filter(obs, actions, mask)


def image_posterior(model, params: dict, images) -> tuple[jax.Array, jax.Array]:
    """``q(z | x)`` of the image encoder in information form ``(eta, J)`` at ``params``."""
    with handlers.block(), handlers.substitute(data=params):
        return model.image_posterior(images)
