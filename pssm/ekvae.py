"""Extended Kalman VAE (EKVAE): Klushyn et al. (2021), "Latent Matters: Learning Deep
State-Space Models", NeurIPS, Sec. 4 (equation numbers below are the paper's).

Generative model (time and batch conventions of :mod:`pssm.core`, steps ``t = 0..T-1``; the
paper counts from 1):

    z_0 ~ N(m0, P0)   or the VHP  p(z_0) = int p(z_0 | zeta) N(zeta; 0, I) dzeta     (Eq. 6)
    z_{t+1} ~ N(F(z_t, u_t) z_t + B(z_t, u_t) u_t, Q(z_t, u_t))                       (Eq. 9)
    [F, B, Q](z, u) = sum_m alpha_m(z, u) [F^(m), B^(m), Q^(m)],
                      alpha = softmax(g(z, u))   (neural linearisation, M base matrices; Eq. 10)
    a_t ~ N(H z_t, R)        time-invariant; H learned, fixed, or the rectangular identity
                             (a_t = first D_a coordinates of z_t: disentangling; Eqs. 12, 14)
    x_t ~ p_theta(x_t | a_t)                          (decoder: Bernoulli logits or Gaussian)

``Q^(m) = L_m L_m^T + q_min I`` (``L_m`` lower triangular, positive diagonal), so every
``Q(z, u)`` is positive definite.

**Inference** (Eq. 13). An encoder ``q_phi(a_t | x_t)`` proposes the auxiliary variables; the
latent path given ``a`` is found by an extended Kalman filter and smoother without Taylor
expansion (App. A.5; :mod:`pssm.extended_kalman`: the learned linearisation is evaluated at the
filtered means). ``model.structure(a, ...)`` returns the LGSSM so linearised, so
:func:`inference.guides.auxiliary` (wrapped by :func:`inference.guides.ekvae_guide`) is the
recognition model
``q(a | x) p(z | a)``.

**Bound** (Eqs. 15-18, ``smoother`` or ``filter`` version):

    log p(x) >= E_{q(a|x)}[sum_t log p(x_t | a_t) - sum_t log q(a_t | x_t) + L(a)]

with ``L(a) <= log p(a)`` the bound of :func:`pssm.extended_kalman.auxiliary_bound` (Eqs. 16-18:
the ``z_{t-1}`` Monte Carlo term at smoothed samples, ``z_t`` integrated out in closed form).
With the VHP (:mod:`pssm.vhp`), ``log p(z_0)`` is replaced by a lower bound ``F_VHP(z_0)``
that the objective hands to ``model.bound`` as ``prior_bound`` (:class:`inference.objectives.
EKVAEBound` passes :func:`inference.objectives.vhp_bound`); the filter's initial belief stays
the Gaussian ``N(m0, P0)`` (learned), which then only places the recognition model.
Distortion ``D = -sum_t log p(x_t | a_t)`` (Eq. 15), rate ``R`` the rest:
:class:`inference.objectives.EKVAEBound` is a :class:`inference.objectives.RateDistortion`, to
train as is (the bound) or under
:class:`inference.objectives.ConstrainedELBO` / ``AnnealedELBO``.
``analytic=True`` takes ``E_q[log q - log f]``, ``E_q[log q_0 - log p(z_0)]`` as closed-form
KLs; the ``log p(a_t | z_{t-1})`` terms are always single-sample estimates.

Missing steps (``mask`` ``(B, T)`` false) skip the Kalman update and drop their ``a_t`` terms
(``x_t``, ``q(a_t | x_t)``, ``p(a_t | .)`` and the ``z_{t-1}`` log-ratio of the same term).

The model is also an ordinary NumPyro program (sites ``z_0``, ``z``, ``a``, ``obs``, and
``zeta`` with the VHP), so ``Trace_ELBO`` with :func:`inference.guides.ekvae_guide` gives the
standard sequential ELBO (pairwise-smoothed samples) and ``Predictive`` generates sequences.
"""

import math
from collections.abc import Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from flax import nnx
from numpyro import handlers
from numpyro.contrib.control_flow import scan

from inference import kalman

from . import nets
from .belief import BeliefStep
from .core import Structure, check_inputs, linear_gaussian
from .extended_kalman import (
    apply_transition,
    auxiliary_bound,
    ekf_predict,
    ekf_update,
    extended_kalman_filter,
)
from .inputs import modalities
from .lgssm import _covariance
from .observations import step_observations
from .rssm import score_rewards
from .vhp import VHP, sample_prior


class NeuralLinearisation(nnx.Module):
    """``(z, u) -> (F, B, Q)``: softmax-weighted base matrices (Eqs. 9-10).

    Args:
        latent_dim, action_dim: ``d`` and ``u`` (``u = 0``: no actions, ``B`` is ``None``).
        num_bases: ``M``.
        hidden: hidden sizes of ``g`` (an :class:`pssm.nets.MLP` ``d + u -> M``).
        F_init, B_init, Q_init: initial base matrices ``(M, d, d)``, ``(M, d, u)``,
            ``(M, d, d)`` (or one matrix for all). Defaults: ``I + init_noise N(0, 1/d)``,
            ``init_noise N(0, 1/u)`` and ``q_init I``.
        q_min: floor of every ``Q^(m)`` (``Q_init`` must exceed it).
    """

    def __init__(
        self,
        latent_dim: int,
        action_dim: int = 0,
        num_bases: int = 8,
        hidden: Sequence[int] = (64,),
        *,
        F_init=None,
        B_init=None,
        Q_init=None,
        init_noise: float = 0.05,
        q_init: float = 1e-2,
        q_min: float = 1e-5,
        activation=nnx.elu,
        param_dtype=None,
        rngs: nnx.Rngs,
    ):
        d, u, M = latent_dim, action_dim, num_bases
        if d < 1 or u < 0 or M < 1:
            raise ValueError(f"need latent_dim >= 1, action_dim >= 0, num_bases >= 1: {d, u, M}")
        dtype = param_dtype or nets.default_param_dtype()
        self.g = nets.MLP(d + u, hidden, M, activation=activation, param_dtype=dtype, rngs=rngs)
        kF, kB = jax.random.split(rngs.params())
        if F_init is None:
            noise = jax.random.normal(kF, (M, d, d), dtype) / math.sqrt(d)
            F_init = jnp.eye(d, dtype=dtype) + init_noise * noise
        self.F = nnx.Param(jnp.broadcast_to(jnp.asarray(F_init, dtype), (M, d, d)))
        if u:
            if B_init is None:
                B_init = init_noise * jax.random.normal(kB, (M, d, u), dtype) / math.sqrt(u)
            self.B = nnx.Param(jnp.broadcast_to(jnp.asarray(B_init, dtype), (M, d, u)))
        else:
            if B_init is not None:
                raise ValueError("B_init given for a transition without actions (action_dim=0)")
            self.B = None
        Q_init = q_init * np.eye(d) if Q_init is None else Q_init
        Q_init = np.broadcast_to(np.asarray(Q_init, np.float64), (M, d, d))
        L = np.linalg.cholesky(np.asarray(Q_init) - q_min * np.eye(d))  # raises if Q_init <= q_min
        diag = np.log(np.expm1(np.diagonal(L, 0, -2, -1)))  # inverse softplus
        raw = np.tril(L, -1) + np.eye(d) * diag[..., None, :]
        self.Q_raw = nnx.Param(jnp.asarray(raw, dtype))
        self.latent_dim, self.action_dim, self.num_bases, self.q_min = d, u, M, q_min

    def bases(self) -> tuple[jax.Array, jax.Array | None, jax.Array]:
        """The base matrices ``F^(m)``, ``B^(m)`` (``None`` without actions), ``Q^(m)``."""
        raw = self.Q_raw[...]
        d = raw.shape[-1]
        diag = jax.nn.softplus(jnp.diagonal(raw, axis1=-2, axis2=-1))
        L = jnp.tril(raw, -1) + jnp.eye(d, dtype=raw.dtype) * diag[..., None, :]
        Q = L @ jnp.swapaxes(L, -1, -2) + self.q_min * jnp.eye(d, dtype=raw.dtype)
        return self.F[...], None if self.B is None else self.B[...], Q

    def weights(self, z: jax.Array, u: jax.Array | None = None) -> jax.Array:
        """``alpha(z, u) = softmax(g(z, u))``, ``(..., M)``."""
        x = z if not self.action_dim else jnp.concatenate([z, u], axis=-1)
        return jax.nn.softmax(self.g(x), axis=-1)

    def __call__(self, z: jax.Array, u: jax.Array | None = None):
        """``(F, B, Q)`` at ``z`` ``(..., d)`` and ``u`` ``(..., u)``: ``(..., d, d)``,
        ``(..., d, u)`` or ``None``, ``(..., d, d)``."""
        if self.action_dim and u is None:
            raise ValueError("this transition takes actions: pass u")
        alpha = self.weights(z, u)
        F, B, Q = self.bases()
        mix = lambda X: jnp.einsum("...m,mij->...ij", alpha, X)
        return mix(F), None if B is None else mix(B), mix(Q)


# ---- the model --------------------------------------------------------------------------------


class IntensityBernoulli(dist.Distribution):
    """Bernoulli cross-entropy of intensities ``x in [0, 1]`` (e.g. anti-aliased grayscale
    pixels): ``log p(x) = x log sigmoid(l) + (1 - x) log sigmoid(-l)`` (NumPyro's ``Bernoulli``
    gives ``-inf`` off ``{0, 1}``). Not normalised on ``[0, 1]``; samples are binary."""

    arg_constraints = {"logits": dist.constraints.real}
    support = dist.constraints.unit_interval

    def __init__(self, logits, *, validate_args=None):
        self.logits = logits
        super().__init__(jnp.shape(logits), validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        shape = sample_shape + self.batch_shape
        return jax.random.bernoulli(key, jax.nn.sigmoid(self.logits), shape).astype(
            jnp.result_type(self.logits)
        )

    def log_prob(self, value):
        return -jax.nn.softplus(-self.logits) * value - jax.nn.softplus(self.logits) * (1 - value)

    @property
    def mean(self):
        return jax.nn.sigmoid(self.logits)


def _per_step_mask(mask, n, T):
    if mask is None:
        return jnp.ones((n, T), bool)
    mask = jnp.asarray(mask)
    if mask.shape != (n, T):
        raise ValueError(f"the EKVAE takes a per-step mask ({n}, {T}), got {mask.shape}")
    return mask.astype(bool)


def ekvae(
    obs_dim: int | Mapping[str, int],
    aux_dim: int,
    latent_dim: int,
    *,
    action_dim: int = 0,
    num_bases: int = 8,
    transition_hidden: Sequence[int] = (64,),
    transition: NeuralLinearisation | None = None,
    decoder_hidden: Sequence[int] = (128,),
    decoder: nnx.Module | None = None,
    likelihood: str = "bernoulli",
    obs_var: float = 0.01,
    learn_obs_var: bool = False,
    H="identity",
    learn_H: bool = False,
    R=None,
    learn_R: bool = True,
    m0=None,
    P0=None,
    learn_initial: bool = True,
    vhp_dim: int | None = None,
    vhp_hidden: Sequence[int] = (64,),
    reward: bool = False,
    reward_hidden: Sequence[int] = (128,),
    seed: int = 0,
):
    """Build the EKVAE (module docstring).

    Args:
        obs_dim: ``p`` (flattened observations, e.g. 256 for 16x16 images), or ``{modality:
            p_k}`` (e.g. dm_control state vectors): ``obs`` is then a dict, concatenated in this
            key order into the one vector ``x_t`` (a ``(B, T, K)`` mask counts a step as seen
            when every modality is).
        aux_dim, latent_dim: ``D_a`` and ``D_z``.
        action_dim: ``u`` (0: no actions).
        num_bases, transition_hidden: ``M`` and the hidden sizes of ``g``.
        transition: a prebuilt :class:`NeuralLinearisation` (overrides the two above).
        decoder_hidden: hidden sizes of the decoder MLP ``a -> x`` (its output: Bernoulli
            logits or the Gaussian mean); ``decoder``: a prebuilt NNX module instead.
        likelihood: ``"bernoulli"`` (intensities in ``[0, 1]`` as cross-entropy) or
            ``"gaussian"`` (variance ``obs_var``, the site ``"decoder_var"`` if learned).
        H: ``"identity"`` (rectangular ``(D_a, D_z)``, Eq. 14; needs ``D_a <= D_z``) or a matrix;
            the initial value if ``learn_H`` (site ``"H"``).
        R: ``(D_a, D_a)`` noise of ``a`` (default ``0.1 I``), learned diagonal if ``learn_R``.
        m0, P0: the filter's initial belief (and, without VHP, the prior of ``z_0``; default
            ``0`` and ``I``); learned (``"m0"``, diagonal ``"P0"``) if ``learn_initial``.
        vhp_dim: latent size of a VHP on ``z_0`` (``None``: the Gaussian prior); networks with
            ``vhp_hidden`` (sites ``"vhp_prior"``, ``"vhp_posterior"``).
        reward: add a reward head (site ``"reward_head"``, hidden sizes ``reward_hidden``): the
            model scores ``rewards[:, t] ~ N(head(z_{t+1}), 1)``
            (:func:`pssm.rssm.score_rewards`), the bound adds it to the distortion.
        seed: initialisation of all networks.

    Returns:
        ``model(obs, actions=None, mask=None)``, a NumPyro program (sites ``z_0``, ``z``, ``a``,
        ``obs``, and ``zeta`` with VHP; parameter sites ``transition``, ``decoder``, ...),
        carrying ``structure`` (the EKF-linearised LGSSM given ``a``), ``bound`` (used by
        :class:`inference.objectives.EKVAEBound`), ``auxiliary_site``, ``auxiliary_dim``,
        ``obs_dim``, ``latent_dim``, ``action_dim``, ``feature_size``, ``obs_dims``,
        ``flatten(obs, mask)``, ``belief_step(encoder=...)`` (:mod:`pssm.belief`) and the
        modules ``transition_net``, ``decoder_net``, ``vhp``.
    """
    dims = modalities(obs_dim)
    if not all(isinstance(v, int) for v in dims.values()):
        raise ValueError(f"the EKVAE takes vector observations, got shapes {dims}")
    names, several = list(dims), isinstance(obs_dim, Mapping)
    obs_dim = sum(dims.values())
    if min(obs_dim, aux_dim, latent_dim) < 1 or action_dim < 0:
        raise ValueError(f"bad sizes: obs {obs_dim}, aux {aux_dim}, latent {latent_dim}, "
                         f"actions {action_dim}")  # fmt: skip
    if likelihood not in ("bernoulli", "gaussian"):
        raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
    rngs = nnx.Rngs(seed)
    d, p_a, p, u = latent_dim, aux_dim, obs_dim, action_dim
    if transition is None:
        transition = NeuralLinearisation(d, u, num_bases, transition_hidden, rngs=rngs)
    elif (transition.latent_dim, transition.action_dim) != (d, u):
        raise ValueError("the transition's latent_dim/action_dim disagree with the model's")
    if decoder is None:
        decoder = nets.MLP(p_a, decoder_hidden, p, rngs=rngs)
    vhp = None if vhp_dim is None else VHP(d, vhp_dim, vhp_hidden, rngs=rngs)
    reward_net = nets.MLP(d, reward_hidden, 1, rngs=rngs) if reward else None
    if isinstance(H, str):
        if H != "identity":
            raise ValueError(f"H must be 'identity' or a matrix, got {H!r}")
        if p_a > d:
            raise ValueError(f"the rectangular identity H needs aux_dim {p_a} <= latent_dim {d}")
        H = jnp.eye(p_a, d)
    H = jnp.asarray(H, dtype=float)
    if H.shape != (p_a, d):
        raise ValueError(f"H has shape {H.shape}, expected ({p_a}, {d})")
    R = 0.1 * jnp.eye(p_a) if R is None else jnp.asarray(R, dtype=float)
    m0 = jnp.zeros(d) if m0 is None else jnp.asarray(m0, dtype=float)
    P0 = jnp.eye(d) if P0 is None else jnp.asarray(P0, dtype=float)

    def parameters():
        """``H, R, N(m0, P0)`` and the registered transition (shared by model, guide, bound)."""
        H_ = numpyro.param("H", H) if learn_H else H
        R_ = _covariance("R", R, "diagonal", learn_R)
        m0_ = numpyro.param("m0", m0) if learn_initial else m0
        P0_ = _covariance("P0", P0, "diagonal", learn_initial)
        return H_, R_, kalman.Gaussian(m0_, P0_), nets.register("transition", transition)

    def likelihood_fn():
        decode = nets.register("decoder", decoder)
        if likelihood == "bernoulli":
            return lambda a: IntensityBernoulli(decode(a)).to_event(1)
        var = obs_var
        if learn_obs_var:
            var = numpyro.param("decoder_var", jnp.asarray(obs_var, dtype=float),
                                constraint=dist.constraints.positive)  # fmt: skip
        return lambda a: dist.Normal(decode(a), jnp.sqrt(var)).to_event(1)

    def flatten(obs, mask=None):
        """``(x, observed)``: the observations as one array ``(B, T, p)`` (a dict of modalities
        concatenated in key order) and the per-step mask ``(B, T)`` (a ``(B, T, K)`` mask: a
        step is seen when all its modalities are)."""
        if several:
            if not isinstance(obs, Mapping) or set(obs) != set(names):
                got = sorted(obs) if isinstance(obs, Mapping) else type(obs).__name__
                raise ValueError(f"obs must be a dict with keys {names}, got {got}")
            obs = jnp.concatenate([jnp.asarray(obs[k]) for k in names], axis=-1)
            if mask is not None and jnp.ndim(mask) == 3:
                mask = jnp.all(jnp.asarray(mask).astype(bool), axis=-1)
        elif isinstance(obs, Mapping):
            raise ValueError("this EKVAE has one modality: pass obs as an array (B, T, p)")
        n, T = jnp.shape(obs)[:2]
        return obs, _per_step_mask(mask, n, T)

    def reward_fn():
        """The registered reward head ``z (..., d) -> (...)`` (``None`` without one)."""
        if reward_net is None:
            return None
        head = nets.register("reward_head", reward_net)
        return lambda z: head(z)[..., 0]

    def check(obs, actions, mask):
        obs, mask = flatten(obs, mask)
        check_inputs(obs, actions if u else None, mask, obs_dim=p, action_dim=u or None)
        if not u and actions is not None:
            raise ValueError("this EKVAE has no actions (action_dim=0) but was given actions")
        if u and actions is None:
            raise ValueError(f"this EKVAE takes actions: pass an array (B, T, {u})")
        n, T = obs.shape[:2]
        if T < 2:
            raise ValueError(f"the EKVAE needs sequences of at least 2 steps, got T={T}")
        return obs, n, T, mask

    def filter_batch(transition_fn, prior, H_, R_, a, actions, observed):
        run = lambda a_, u_, m_: extended_kalman_filter(transition_fn, prior, H_, R_, a_, u_, m_)
        if actions is None:
            return jax.vmap(lambda a_, m_: run(a_, None, m_))(a, observed)
        return jax.vmap(run)(a, actions, observed)

    def structure(a, actions=None, mask=None) -> Structure:
        """The LGSSM linearised by the EKF at the filtered means, ``a`` as observations."""
        n, T = a.shape[:2]
        observed = _per_step_mask(mask, n, T)
        H_, R_, prior, transition_fn = parameters()
        ekf = filter_batch(transition_fn, prior, H_, R_, a, actions, observed)
        batch = lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x)))
        return Structure(
            kalman.Gaussian(batch(prior.mean), batch(prior.cov)),
            ekf.dynamics,
            kalman.Emissions(a, batch(R_), observed, batch(H_)),
        )

    @linear_gaussian(structure, exact=False)
    def model(obs, actions=None, mask=None, rewards=None):
        obs, n, T, observed = check(obs, actions, mask)
        H_, R_, prior, transition_fn = parameters()
        p_x = likelihood_fn()
        with numpyro.plate("batch", n):
            if vhp is None:
                z0 = numpyro.sample("z_0", dist.MultivariateNormal(*prior))
            else:
                prior_fn = nets.register("vhp_prior", vhp.prior)
                z0 = sample_prior(prior_fn, vhp.zeta_dim, (n,), site="z_0")

        def step(z, u_t):
            _, _, mean, Q = apply_transition(transition_fn, z, u_t)
            with numpyro.plate("batch", n):
                z = numpyro.sample("z", dist.MultivariateNormal(mean, Q))
            return z, z

        u_seq = None if actions is None else jnp.moveaxis(actions[:, :-1], 1, 0)
        _, zs = scan(step, z0, u_seq, length=T - 1)
        z = jnp.concatenate([z0[:, None], jnp.moveaxis(zs, 0, 1)], axis=1)
        clean = jnp.where(observed[..., None], obs, 0.0)
        with numpyro.plate("batch", n):
            p_a = dist.MultivariateNormal(jnp.einsum("ij,ntj->nti", H_, z), R_)
            a = numpyro.sample("a", p_a.mask(observed).to_event(1))
            numpyro.sample("obs", p_x(a).mask(observed).to_event(1), obs=clean)
        if rewards is not None:
            score_rewards(rewards, z, lambda f: needs_head()(f)[..., None])
        return z

    def needs_head():
        head = reward_fn()
        if head is None:
            raise ValueError("this EKVAE has no reward head: build it with reward=True")
        return head

    def bound(
        key, a, obs, actions=None, mask=None, rewards=None, *, posterior="smoother",
        analytic=True, prior_bound=None,
    ):  # fmt: skip
        """``{"distortion": -sum log p(x|a) [- sum log p(r|z)], "log_p_a": sum L(a), ...}`` over
        the batch, at the auxiliary sample ``a`` (inside a NumPyro parameter context); with
        ``rewards`` the reward term is scored at the bound's sample of ``z``. With a VHP,
        ``prior_bound(key, prior, posterior, z_0) <= log p(z_0)`` estimates the prior's
        log-density from its two networks (:func:`inference.objectives.vhp_bound`); it is
        unused with the Gaussian prior."""
        obs, n, T, observed = check(obs, actions, mask)
        H_, R_, prior, transition_fn = parameters()
        clean = jnp.where(observed[..., None], obs, 0.0)
        log_px = likelihood_fn()(a).log_prob(clean)  # (n, T)
        distortion = -jnp.sum(jnp.where(observed, log_px, 0.0))
        log_prior = None
        if vhp is not None:
            if prior_bound is None:
                raise ValueError(
                    "this EKVAE's prior of z_0 is a VHP: pass prior_bound, a lower bound "
                    "(key, prior, posterior, z_0) -> F <= log p(z_0) such as "
                    "inference.objectives.vhp_bound"
                )
            prior_fn = nets.register("vhp_prior", vhp.prior)
            posterior_fn = nets.register("vhp_posterior", vhp.posterior)
            log_prior = lambda k, z0: prior_bound(k, prior_fn, posterior_fn, z0)
        one = partial(auxiliary_bound, transition=transition_fn, prior=prior, H=H_, R=R_,
                      posterior=posterior, log_prior=log_prior, analytic=analytic)  # fmt: skip
        keys = jax.random.split(key, n)
        if actions is None:
            parts = jax.vmap(lambda k, a_, m_: one(k, a=a_, mask=m_))(keys, a, observed)
        else:
            parts = jax.vmap(lambda k, a_, u_, m_: one(k, a=a_, actions=u_, mask=m_))(
                keys, a, actions, observed
            )
        reward_nll = jnp.zeros((), distortion.dtype)
        if rewards is not None:
            head = needs_head()
            scored = lambda: score_rewards(rewards, parts["z"], lambda f: head(f)[..., None])
            site = handlers.trace(scored).get_trace()["reward"]
            reward_nll = -jnp.sum(site["fn"].log_prob(site["value"]))
        return {
            "distortion": distortion + reward_nll,
            "reward_nll": reward_nll,
            "log_p_a": jnp.sum(parts["bound"]),
            "initial": jnp.sum(parts["initial"]),
            "transition": jnp.sum(parts["transition"]),
            "posterior_kl": jnp.sum(parts["posterior_kl"]),
        }

    def belief_step(encoder: nnx.Module | None = None, encoder_name: str = "encoder") -> BeliefStep:
        """The online EKF (:mod:`pssm.belief`): the belief is the EKF's ``N(m, P)`` over ``z``
        (``(B, d)``, ``(B, d, d)``); ``condition`` takes ``a_t`` as the encoder's mean of
        ``q(a_t | x_t)`` and applies :func:`pssm.extended_kalman.ekf_update`, ``predict`` is
        :func:`pssm.extended_kalman.ekf_predict` (the learned linearisation at the mean and
        the action, no sampling), the features are the mean; ``filter`` runs
        :func:`pssm.extended_kalman.extended_kalman_filter` (which scans those two steps) on
        the encoder means of a whole sequence.

        Args:
            encoder: the recognition network ``x -> (loc, scale)`` of ``a`` (the guide's:
                ``inference.guides.ekvae_guide(model).encoder``), registered as
                ``encoder_name`` (its parameters are the guide's).
        """
        if encoder is None:
            raise ValueError("the EKVAE's belief conditions on a_t ~ q(a_t | x_t): pass the "
                             "guide's encoder, belief_step(encoder=guide.encoder)")  # fmt: skip
        H_, R_, prior, transition_fn = parameters()
        encode = nets.register(encoder_name, encoder)
        logits = nets.register("decoder", decoder)
        head = reward_fn()

        def init(batch_size):
            return kalman.Gaussian(
                jnp.broadcast_to(prior.mean, (batch_size, d)),
                jnp.broadcast_to(prior.cov, (batch_size, d, d)),
            )

        def condition(belief, obs, mask, key):
            del key
            parts, seen = step_observations(obs, mask, names)
            x = jnp.concatenate([parts[k] for k in names], axis=-1).astype(belief.mean.dtype)
            a, _ = encode(x)
            update = lambda b, a_t, m_t: ekf_update(b, a_t, H_, R_, m_t)[0]
            return jax.vmap(update)(belief, a, jnp.all(seen, axis=-1))

        def predict(belief, action, key):
            del key
            if not u:
                return jax.vmap(lambda b: ekf_predict(transition_fn, b)[0])(belief)
            a = jnp.asarray(action, belief.mean.dtype).reshape(belief.mean.shape[0], u)
            return jax.vmap(lambda b, u_t: ekf_predict(transition_fn, b, u_t)[0])(belief, a)

        def decode(f):
            out = logits(jnp.einsum("ij,...j->...i", H_, f))  # the mean of x given a = H z
            out = jax.nn.sigmoid(out) if likelihood == "bernoulli" else out
            if not several:
                return out
            edges = np.cumsum([dims[k] for k in names])[:-1]
            return dict(zip(names, jnp.split(out, edges, axis=-1), strict=True))

        def filter_sequence(obs, actions, mask, key):
            del key
            x, observed = flatten(obs, mask)
            a, _ = encode(jnp.where(observed[..., None], x, 0.0))
            return filter_batch(transition_fn, prior, H_, R_, a, actions, observed).filtered

        return BeliefStep(init, condition, predict, lambda b: b.mean, head, decode,
                          filter_sequence)  # fmt: skip

    model.bound = bound
    model.belief_step, model.flatten = belief_step, flatten
    model.feature_size = d
    model.obs_dims = dims
    model.auxiliary_site = "a"
    model.auxiliary_dim = p_a
    model.obs_dim = p
    model.latent_dim = d
    model.action_dim = u
    model.transition_net, model.decoder_net, model.vhp = transition, decoder, vhp
    model.parameters = parameters
    return model


def infer_latents(
    model, guide, params: dict, obs, actions=None, mask=None, *, posterior: str = "smoother"
) -> kalman.Gaussian:
    """Posterior of ``z`` at the encoder means: smoothed (or filtered) means ``(B, T, d)`` and
    covariances ``(B, T, d, d)``, with ``params`` the constrained parameters (e.g.
    ``objective.constrain(state.params)``)."""
    if posterior not in ("smoother", "filter"):
        raise ValueError(f"posterior must be 'smoother' or 'filter', got {posterior!r}")
    obs, observed = model.flatten(obs, mask)
    with handlers.block(), handlers.substitute(data=params):
        clean = jnp.where(observed[..., None], obs, 0.0)
        loc, _ = nets.register(guide.encoder_name, guide.encoder)(clean)
        s = model.structure(loc, actions, observed)
    if posterior == "filter":
        return jax.vmap(kalman.filter)(*s).filtered
    return jax.vmap(kalman.smoother)(*s).smoothed
