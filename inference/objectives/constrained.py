"""Rate-distortion objectives: constrained optimisation (REWO for SSMs) and KL annealing.

Klushyn et al. (2021, "Latent Matters: Learning Deep State-Space Models", NeurIPS, Sec. 2-3,
Alg. 1), after Klushyn et al. (2019, "Learning Hierarchical Priors in VAEs", REWO) and Alemi et
al. (2018, "Fixing a Broken ELBO"). Any sequential ELBO splits into

    F_ELBO = -D - R,   D = -E_q[log p(x | .)]   (distortion: the observation sites),
                       R = everything else       (rate: latent sites of model and guide).

**Constrained optimisation (CO).** Minimise the rate subject to ``D <= D0`` through the
Lagrangian (Eq. 4) ``L = R + lambda (D - D0)``: gradient steps on ``L`` for the parameters and
a multiplicative update of the multiplier after every step (Eq. 8),

    D_hat_i   = (1 - alpha) D_batch + alpha D_hat_{i-1}        (D_hat_0 = D_batch),
    lambda_i  = lambda_{i-1} exp(-nu f(lambda_{i-1}, delta) delta),   delta = (D_hat_i - D0) / s,
    f(lambda, delta) = (1 - Heaviside(delta)) tanh(tau1 (1/lambda - 1)) - tau2 Heaviside(delta),

so ``lambda`` grows while the constraint is violated and, once it holds, returns to 1 (from
either side), where ``L`` is the negative ELBO up to the constant ``D0``. (Alg. 1 updates
``lambda`` from the batch before stepping on it; here the batch's distortion is known after the
step, so step ``i`` uses ``lambda_{i-1}``: a one-step lag.) ``s`` normalises the
violation (default ``|D0|``: relative violations, so ``nu`` does not depend on the units of
``D``). Training starts in an *initial phase* (Alg. 1) in which only the encoder/decoder
parameters (chosen by a name predicate; EKVAE's ``theta, phi``) receive gradients; it ends for
good the first time ``D_hat <= D0``. The phase is implemented in the loss: the other parameter
values are passed through ``stop_gradient`` (an optimizer without weight decay then leaves them
unchanged). The rescaled objective ``-(R / lambda + D)`` is a lower bound on ``log p(x)`` for
``0 <= lambda <= 1`` only (Sec. 3): ``clip_after`` clips the multiplier to ``[0, 1]`` from that
step on, ending training on the ELBO itself. The metric ``"elbo"`` is always ``-(D + R)``.

Constants (the paper's appendix with its values is not available; chosen here, see the tests):
``nu = 0.1`` (a 10 % relative violation changes ``lambda`` by about 1 % per step),
``tau1 = 3`` (``f -> -tanh(3) ~ -1`` for ``lambda >> 1``: geometric decay back towards 1, slowing
near 1), ``tau2 = 1``, ``alpha = 0.99`` (moving average over ~100 steps), ``lambda_0 = 1``;
``lambda`` is kept in ``[1e-3, 1e4]`` for numerical safety.

**D0 heuristic** (``d0=None``): the reconstruction the initial phase reaches, plus slack. For
the first ``calibration_steps`` updates only the encoder/decoder train, on
``calibration_rate_weight R + lambda_0 D`` (default weight 1: Alg. 1's initial phase with
``lambda = lambda_0 = 1``, the transition and prior held at their initial values); then
``D0 = D_hat + slack |D_hat|`` (``slack = 0.05``), the constraint holds and the main phase starts:
from there on the reconstruction may not degrade by more than the slack while the dynamics are
learned, ``lambda`` rising whenever it would. Variant: ``calibration_rate_weight=0`` calibrates on
a plain autoencoder (the best reachable reconstruction; a tight ``D0``), with
``lambda_after_calibration="ratio"`` starting the main phase at ``lambda = |R_hat| / |D_hat|``
so that the rate, which the autoencoder ignored, enters gradually as ``lambda`` decays (as after
Alg. 1's initial phase, where ``lambda`` has grown while ``D > D0``).

**Annealing** (the baseline, Bowman et al. 2016): minimise ``D + beta_i R`` with ``beta`` rising
from ``beta_start`` to 1 over ``warmup_steps`` updates (or any schedule ``step -> beta``); only
the ``beta = 1`` end is the ELBO.

Both wrap any :class:`RateDistortion` (the protocol below): :class:`TraceRateDistortion` splits a
NumPyro ELBO (``Trace_ELBO``, ``TraceMeanField_ELBO``) of any model and guide by site;
``inference.objectives.EKVAEBound`` computes EKVAE's own bound. All are ``MetricsELBO`` objects for
``inference.training.elbo_objective`` (their state is its ``aux``).
"""

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.infer import Trace_ELBO
from numpyro.infer.elbo import ELBO

PyTree = Any
NU, TAU1, TAU2, ALPHA = 0.1, 3.0, 1.0, 0.99
LAMBDA_BOUNDS = (1e-3, 1e4)


@runtime_checkable
class RateDistortion(Protocol):
    """An ELBO split into distortion and rate.

    ``rate_distortion`` takes the arguments of NumPyro's ``ELBO.loss`` and returns
    ``{"distortion": D, "rate": R, "mutable_state": dict | None, "metrics": dict}`` (the last two
    optional) with ``-(D + R)`` the ELBO estimate, both scalars.
    """

    def rate_distortion(
        self, rng_key: jax.Array, param_map: dict, model: Callable, guide: Callable, *args, **kwargs
    ) -> dict: ...


class RateDistortionELBO(ELBO):
    """Base class: a :class:`RateDistortion` is also a ``MetricsELBO`` whose loss is ``D + R``."""

    can_infer_discrete = False

    def rate_distortion(self, rng_key, param_map, model, guide, *args, **kwargs) -> dict:
        raise NotImplementedError

    def loss_with_metrics(self, rng_key, param_map, model, guide, *args, **kwargs) -> dict:
        out = self.rate_distortion(rng_key, param_map, model, guide, *args, **kwargs)
        D, R = out["distortion"], out["rate"]
        metrics = {**out.get("metrics", {}), "distortion": D, "rate": R, "elbo": -(D + R)}
        return {"loss": D + R, "metrics": metrics, "mutable_state": out.get("mutable_state")}

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        out = self.loss_with_metrics(rng_key, param_map, model, guide, *args, **kwargs)
        return {"loss": out["loss"], "mutable_state": out["mutable_state"]}

    def loss(self, rng_key, param_map, model, guide, *args, **kwargs):
        return self.loss_with_metrics(rng_key, param_map, model, guide, *args, **kwargs)["loss"]


def _is_distortion_site(site: dict) -> bool:
    """Observed sample sites other than ``numpyro.factor`` terms (``Unit`` distributions)."""
    fn = site["fn"]
    while isinstance(fn, dist.MaskedDistribution | dist.ExpandedDistribution | dist.Independent):
        fn = fn.base_dist
    return site["type"] == "sample" and site["is_observed"] and not isinstance(fn, dist.Unit)


class TraceRateDistortion(RateDistortionELBO):
    """Distortion and rate of any NumPyro model and guide, split by site.

    The per-site terms of a NumPyro ELBO built with ``sum_sites=False`` (default
    ``Trace_ELBO(sum_sites=False)``; ``TraceMeanField_ELBO(sum_sites=False)`` for analytic
    per-site KLs) are summed into ``D = -sum(observation sites)`` and ``R = -sum(the rest)``.

    Args:
        elbo: the NumPyro ELBO, with ``sum_sites=False``.
        distortion_sites: names of the distortion sites, or a predicate on the name. Default:
            the model's observed sample sites that are not ``numpyro.factor`` terms, read from
            one extra (unused, compiled away) trace of the model replayed on the guide.
    """

    def __init__(
        self,
        elbo: ELBO | None = None,
        *,
        distortion_sites: Iterable[str] | Callable[[str], bool] | None = None,
    ):
        elbo = Trace_ELBO(sum_sites=False) if elbo is None else elbo
        if getattr(elbo, "sum_sites", True):
            raise ValueError("TraceRateDistortion needs a NumPyro ELBO built with sum_sites=False")
        super().__init__(num_particles=elbo.num_particles)
        self.elbo = elbo
        self.multi_sample_guide = getattr(elbo, "multi_sample_guide", False)
        if distortion_sites is None or callable(distortion_sites):
            self.distortion_sites = distortion_sites
        else:
            names = frozenset(distortion_sites)
            self.distortion_sites = lambda name: name in names

    def _predicate(self, param_map, model, guide, args, kwargs) -> Callable[[str], bool]:
        if self.distortion_sites is not None:
            return self.distortion_sites
        key = jax.random.PRNGKey(0)
        with handlers.block():
            guide_tr = handlers.trace(
                handlers.substitute(handlers.seed(guide, key), data=param_map)
            ).get_trace(*args, **kwargs)
            model_tr = handlers.trace(
                handlers.replay(handlers.substitute(handlers.seed(model, key), data=param_map),
                                guide_tr)
            ).get_trace(*args, **kwargs)  # fmt: skip
        names = {name for name, site in model_tr.items() if _is_distortion_site(site)}
        if not names:
            raise ValueError("the model has no observed sample site: nothing is distortion")
        return lambda name: name in names

    def rate_distortion(self, rng_key, param_map, model, guide, *args, **kwargs) -> dict:
        is_distortion = self._predicate(param_map, model, guide, args, kwargs)
        out = self.elbo.loss_with_mutable_state(rng_key, param_map, model, guide, *args, **kwargs)
        per_site = out["loss"]  # {name: -(log p - log q)}
        if not isinstance(per_site, dict):
            raise ValueError("the wrapped ELBO returned a scalar: build it with sum_sites=False")
        zero = jnp.zeros(())
        D = sum((v for k, v in per_site.items() if is_distortion(k)), start=zero)
        R = sum((v for k, v in per_site.items() if not is_distortion(k)), start=zero)
        return {"distortion": D, "rate": R, "mutable_state": out.get("mutable_state")}


# ---- constrained optimisation ----------------------------------------------------------------


def f_lambda(lam: jax.Array, delta: jax.Array, tau1: float = TAU1, tau2: float = TAU2):
    """``f(lambda, delta) = (1 - H(delta)) tanh(tau1 (1/lambda - 1)) - tau2 H(delta)``, with the
    Heaviside step ``H(delta) = 1`` for ``delta > 0`` else 0 (Latent Matters, Sec. 3.2)."""
    violated = delta > 0
    return jnp.where(violated, -tau2, jnp.tanh(tau1 * (1.0 / lam - 1.0)))


def update_multiplier(
    lam: jax.Array,
    delta: jax.Array,
    *,
    nu: float = NU,
    tau1: float = TAU1,
    tau2: float = TAU2,
    bounds: tuple[float, float] = LAMBDA_BOUNDS,
) -> jax.Array:
    """Eq. 8: ``lambda exp(-nu f(lambda, delta) delta)``, clipped to ``bounds``."""
    new = lam * jnp.exp(-nu * f_lambda(lam, delta, tau1, tau2) * delta)
    return jnp.clip(new, *bounds)


class REWOState(NamedTuple):
    """State of :class:`ConstrainedELBO` (the ``aux`` of an ``elbo_objective``).

    Attributes:
        multiplier: the Lagrange multiplier ``lambda``.
        distortion: the moving average ``D_hat``.
        rate: the moving average of the rate (same ``alpha``).
        d0: the constraint level (NaN until calibrated when chosen automatically).
        initial_phase: whether only the encoder/decoder are trained.
        step: updates done.
    """

    multiplier: jax.Array
    distortion: jax.Array
    rate: jax.Array
    d0: jax.Array
    initial_phase: jax.Array
    step: jax.Array


def encoder_decoder(name: str) -> bool:
    """Default initial-phase predicate: parameter sites whose name contains ``encoder`` or
    ``decoder`` (e.g. ``"encoder$params"``, ``"decoder_var"``)."""
    return "encoder" in name or "decoder" in name


def gate_params(param_map: dict, trainable: Callable[[str], bool], frozen: jax.Array) -> dict:
    """``param_map`` with every site not ``trainable`` behind ``stop_gradient`` where ``frozen``
    (a traced boolean); values are unchanged."""

    def gate(v):
        return jnp.where(frozen, jax.lax.stop_gradient(v), v)

    return {k: v if trainable(k) else jax.tree.map(gate, v) for k, v in param_map.items()}


class ConstrainedELBO(RateDistortionELBO):
    """REWO for state space models (Latent Matters Alg. 1): ``R + lambda (D - D0)``.

    Args:
        inner: a :class:`RateDistortion` (e.g. :class:`TraceRateDistortion`,
            ``inference.objectives.EKVAEBound``).
        d0: the distortion bound ``D0``, in the units of ``inner``'s distortion (a sum over the
            minibatch for NumPyro ELBOs); ``None``: calibrated (module docstring).
        nu, tau1, tau2, alpha: constants of the multiplier update and the moving average.
        lambda_init: ``lambda_0``.
        lambda_bounds: ``lambda`` is clipped to this interval.
        constraint_scale: ``s`` in ``delta = (D_hat - D0) / s``; default ``|D0|``.
        calibration_steps, slack, calibration_rate_weight: the automatic ``D0``.
        lambda_after_calibration: ``lambda`` when the calibration ends: ``"ratio"``
            (``|R_hat| / |D_hat|``, clipped to ``[1, lambda_max]``), a number, or ``None``
            (default: keep ``lambda_0``).
        initial_phase_params: predicate on parameter site names: the sites trained in the
            initial phase (default :func:`encoder_decoder`).
        initial_rate_weight: weight of the rate in the initial phase after calibration (Alg. 1:
            1, the Lagrangian itself).
        clip_after: from this many updates on, the loss uses ``clip(lambda, 0, 1)`` (a lower
            bound); ``None``: never.
    """

    def __init__(
        self,
        inner: RateDistortion,
        d0: float | None = None,
        *,
        nu: float = NU,
        tau1: float = TAU1,
        tau2: float = TAU2,
        alpha: float = ALPHA,
        lambda_init: float = 1.0,
        lambda_bounds: tuple[float, float] = LAMBDA_BOUNDS,
        constraint_scale: float | None = None,
        calibration_steps: int = 500,
        slack: float = 0.05,
        calibration_rate_weight: float = 1.0,
        lambda_after_calibration: float | str | None = None,
        initial_phase_params: Callable[[str], bool] = encoder_decoder,
        initial_rate_weight: float = 1.0,
        clip_after: int | None = None,
    ):
        if not hasattr(inner, "rate_distortion"):
            raise TypeError("inner must implement rate_distortion (the RateDistortion protocol)")
        if d0 is not None and not math.isfinite(d0):
            raise ValueError(f"d0={d0} must be finite (or None for the calibrated heuristic)")
        lo, hi = lambda_bounds
        if not 0 <= lo < hi or not lo <= lambda_init <= hi:
            raise ValueError(f"need 0 <= lo <= lambda_init <= hi: {lambda_bounds}, {lambda_init}")
        if nu <= 0 or tau1 <= 0 or tau2 <= 0 or not 0 <= alpha < 1:
            raise ValueError(f"need nu, tau1, tau2 > 0, alpha in [0, 1): {nu, tau1, tau2, alpha}")
        if d0 is None and calibration_steps < 1:
            raise ValueError("the calibrated D0 needs calibration_steps >= 1")
        if constraint_scale is not None and not constraint_scale > 0:
            raise ValueError(f"constraint_scale={constraint_scale} must be positive")
        if slack < 0:
            raise ValueError(f"slack={slack} must be >= 0")
        super().__init__(num_particles=getattr(inner, "num_particles", 1))
        self.inner, self.d0 = inner, d0
        self.nu, self.tau1, self.tau2, self.alpha = nu, tau1, tau2, alpha
        self.lambda_init, self.lambda_bounds = lambda_init, (lo, hi)
        self.constraint_scale = constraint_scale
        self.calibration_steps, self.slack = calibration_steps, slack
        self.calibration_rate_weight = calibration_rate_weight
        if not (lambda_after_calibration is None or lambda_after_calibration == "ratio"
                or float(lambda_after_calibration) > 0):  # fmt: skip
            raise ValueError(f"lambda_after_calibration={lambda_after_calibration!r}: None, "
                             "'ratio' or a positive number")  # fmt: skip
        self.lambda_after_calibration = lambda_after_calibration
        self.initial_phase_params = initial_phase_params
        self.initial_rate_weight = initial_rate_weight
        self.clip_after = clip_after
        self.multi_sample_guide = getattr(inner, "multi_sample_guide", False)

    def init_aux(self) -> REWOState:
        dtype = jnp.result_type(float)
        d0 = jnp.nan if self.d0 is None else self.d0
        return REWOState(
            jnp.asarray(self.lambda_init, dtype),
            jnp.zeros((), dtype),
            jnp.zeros((), dtype),
            jnp.asarray(d0, dtype),
            jnp.asarray(True),
            jnp.zeros((), jnp.int32),
        )

    def effective_multiplier(self, state: REWOState) -> jax.Array:
        """``lambda`` as the loss uses it (clipped to ``[0, 1]`` after ``clip_after``)."""
        if self.clip_after is None:
            return state.multiplier
        return jnp.where(
            state.step >= self.clip_after, jnp.clip(state.multiplier, 0.0, 1.0), state.multiplier
        )

    def loss_with_metrics(self, rng_key, param_map, model, guide, *args, aux=None, **kwargs):
        state = self.init_aux() if aux is None else aux
        calibrating = jnp.isnan(state.d0)
        gated = gate_params(param_map, self.initial_phase_params, state.initial_phase)
        out = self.inner.rate_distortion(rng_key, gated, model, guide, *args, **kwargs)
        D, R = out["distortion"], out["rate"]
        lam = jax.lax.stop_gradient(self.effective_multiplier(state))
        rate_weight = jnp.where(
            calibrating,
            self.calibration_rate_weight,
            jnp.where(state.initial_phase, self.initial_rate_weight, 1.0),
        )
        d0 = jnp.where(calibrating, 0.0, state.d0)
        loss = rate_weight * R + lam * (D - d0)
        metrics = {
            **out.get("metrics", {}),
            "distortion": D,
            "rate": R,
            "elbo": -(D + R),
            "lagrange_multiplier": lam,
            "distortion_avg": state.distortion,
            "rate_avg": state.rate,
            "d0": state.d0,
            "initial_phase": state.initial_phase.astype(D.dtype),
            "rate_weight": rate_weight,
        }
        return {"loss": loss, "metrics": metrics, "mutable_state": out.get("mutable_state")}

    def update_aux(self, state: REWOState, metrics: dict) -> REWOState:
        """Alg. 1 after an optimizer step: moving average, calibration, multiplier, phase."""
        average = lambda new, old: jnp.where(
            state.step == 0, new, (1 - self.alpha) * new + self.alpha * old
        )
        D_hat = average(jax.lax.stop_gradient(metrics["distortion"]), state.distortion)
        R_hat = average(jax.lax.stop_gradient(metrics["rate"]), state.rate)
        step = state.step + 1
        d0, lam = state.d0, state.multiplier
        if self.d0 is None:
            ready = jnp.isnan(d0) & (step >= self.calibration_steps)
            d0 = jnp.where(ready, D_hat + self.slack * jnp.abs(D_hat), d0)
            if self.lambda_after_calibration == "ratio":
                start = jnp.abs(R_hat) / jnp.maximum(jnp.abs(D_hat), 1e-12)
                lam = jnp.where(ready, jnp.clip(start, 1.0, self.lambda_bounds[1]), lam)
            elif self.lambda_after_calibration is not None:
                lam = jnp.where(ready, self.lambda_after_calibration, lam)
        calibrated = ~jnp.isnan(d0)
        scale = jnp.abs(d0) if self.constraint_scale is None else self.constraint_scale
        delta = jnp.where(calibrated, (D_hat - d0) / jnp.maximum(scale, 1e-12), 0.0)
        new = update_multiplier(
            lam, delta, nu=self.nu, tau1=self.tau1, tau2=self.tau2, bounds=self.lambda_bounds
        )
        lam = jnp.where(calibrated, new, lam)
        initial = state.initial_phase & ~(calibrated & (D_hat <= d0))
        return REWOState(lam, D_hat, R_hat, d0, initial, step)


# ---- annealing -------------------------------------------------------------------------------


class AnnealState(NamedTuple):
    """State of :class:`AnnealedELBO`: the number of updates done."""

    step: jax.Array


def linear_warmup(warmup_steps: int, beta_start: float = 0.0) -> Callable[[jax.Array], jax.Array]:
    """``beta(step)`` rising linearly from ``beta_start`` to 1 over ``warmup_steps``, then 1."""
    if warmup_steps < 0 or not 0 <= beta_start <= 1:
        raise ValueError(f"need warmup_steps >= 0 and beta_start in [0, 1], got "
                         f"{warmup_steps}, {beta_start}")  # fmt: skip

    def schedule(step):
        frac = jnp.clip(step / max(warmup_steps, 1), 0.0, 1.0)
        return beta_start + (1.0 - beta_start) * frac

    return schedule


class AnnealedELBO(RateDistortionELBO):
    """KL annealing: minimise ``D + beta(step) R``.

    Args:
        inner: a :class:`RateDistortion`.
        schedule: ``step -> beta`` (jit-traceable; an optax schedule works). Default
            :func:`linear_warmup` over ``warmup_steps`` from ``beta_start``.
    """

    def __init__(
        self,
        inner: RateDistortion,
        schedule: Callable[[jax.Array], jax.Array] | None = None,
        *,
        warmup_steps: int = 1000,
        beta_start: float = 0.0,
    ):
        if not hasattr(inner, "rate_distortion"):
            raise TypeError("inner must implement rate_distortion (the RateDistortion protocol)")
        super().__init__(num_particles=getattr(inner, "num_particles", 1))
        self.inner = inner
        self.schedule = linear_warmup(warmup_steps, beta_start) if schedule is None else schedule
        self.multi_sample_guide = getattr(inner, "multi_sample_guide", False)

    def init_aux(self) -> AnnealState:
        return AnnealState(jnp.zeros((), jnp.int32))

    def loss_with_metrics(self, rng_key, param_map, model, guide, *args, aux=None, **kwargs):
        state = self.init_aux() if aux is None else aux
        out = self.inner.rate_distortion(rng_key, param_map, model, guide, *args, **kwargs)
        D, R = out["distortion"], out["rate"]
        beta = jnp.asarray(self.schedule(state.step), D.dtype)
        metrics = {**out.get("metrics", {}), "distortion": D, "rate": R, "elbo": -(D + R),
                   "beta": beta}  # fmt: skip
        return {"loss": D + beta * R, "metrics": metrics, "mutable_state": out.get("mutable_state")}

    def update_aux(self, state: AnnealState, metrics: dict) -> AnnealState:
        return AnnealState(state.step + 1)
