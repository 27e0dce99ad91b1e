"""Rate-distortion objectives: REWO's multiplier update (Latent Matters Eq. 8, Alg. 1) against a
plain-Python transcription, the site split of NumPyro ELBOs, the initial phase, the [0, 1]
clipping and KL annealing, on a one-dimensional linear VAE."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.infer import Trace_ELBO, TraceMeanField_ELBO

from inference import training
from inference.objectives import (
    AnnealedELBO,
    ConstrainedELBO,
    TraceRateDistortion,
    f_lambda,
    linear_warmup,
    update_multiplier,
)
from inference.objectives.constrained import ALPHA, LAMBDA_BOUNDS, NU, TAU1, TAU2

FAST = {"xla_backend_optimization_level": 0}  # compile time dominates these tests
N = 32
X = jnp.asarray(np.random.default_rng(0).normal(size=(N, 1)) * 2.0)


def model(x, extra_factor=False):
    """z ~ N(prior_loc, 1), x ~ N(decoder_w z, 0.1^2): ``prior_loc`` is not encoder/decoder."""
    loc = numpyro.param("prior_loc", jnp.array(0.5))
    w = numpyro.param("decoder_w", jnp.array(0.3))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(loc, 1.0).expand([1]).to_event(1))
        numpyro.sample("x", dist.Normal(w * z, 0.1).to_event(1), obs=x)
    if extra_factor:
        numpyro.factor("penalty", -0.5 * w**2)


def guide(x, extra_factor=False):
    w = numpyro.param("encoder_w", jnp.array(0.1))
    s = numpyro.param("encoder_s", jnp.array(1.0), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Normal(w * x, s).to_event(1))


def train(elbo, steps, lr=0.05):
    """``steps`` Adam updates of ``training.train_steps`` (full batch); returns the state and
    the per-step metrics as NumPy arrays."""
    objective = training.elbo_objective(model, guide, elbo)
    optimizer = optax.adam(lr)
    state = training.init_train_state(objective, optimizer, jax.random.key(0), {"x": X})
    run = lambda state: training.train_steps(objective, optimizer, state, {"x": X}, steps,
                                             batch_size=N)  # fmt: skip
    state, metrics = jax.jit(run).lower(state).compile(compiler_options=FAST)(state)
    return objective, state, {k: np.asarray(v) for k, v in metrics.items()}


# ---- the multiplier update -------------------------------------------------------------------


def _reference_update(lam, delta, nu=NU, tau1=TAU1, tau2=TAU2):
    """Eq. 8 transcribed: ``lambda exp(-nu f delta)``,
    ``f = (1 - H) tanh(tau1 (1/lambda - 1)) - tau2 H``."""
    heaviside = 1.0 if delta > 0 else 0.0
    f = (1 - heaviside) * math.tanh(tau1 * (1 / lam - 1)) - tau2 * heaviside
    return min(max(lam * math.exp(-nu * f * delta), LAMBDA_BOUNDS[0]), LAMBDA_BOUNDS[1])


@settings(max_examples=20)
@given(
    st.floats(1e-3, 1e4),
    st.floats(-5.0, 5.0).filter(lambda d: abs(d) > 1e-6),
)
def test_multiplier_update_moves_the_right_way_and_stays_in_bounds(lam, delta):
    new = float(update_multiplier(jnp.asarray(lam), jnp.asarray(delta)))
    np.testing.assert_allclose(new, _reference_update(lam, delta), rtol=1e-12)
    assert LAMBDA_BOUNDS[0] <= new <= LAMBDA_BOUNDS[1]
    if delta > 0:  # constraint violated: more weight on the distortion
        assert new > lam or new == LAMBDA_BOUNDS[1]
    elif lam > 1 + 1e-9:  # satisfied: back towards 1 from above ...
        assert new < lam
    elif lam < 1 - 1e-9:  # ... and from below
        assert new > lam
    # f itself: -tau2 when violated, tanh(tau1 (1/lambda - 1)) otherwise
    expected_f = -TAU2 if delta > 0 else math.tanh(TAU1 * (1 / lam - 1))
    np.testing.assert_allclose(float(f_lambda(lam, delta)), expected_f, rtol=1e-12, atol=1e-15)


def test_multiplier_returns_to_one_once_the_constraint_holds():
    lam = jnp.asarray(50.0)
    path = []
    for _ in range(3000):
        lam = update_multiplier(lam, jnp.asarray(-0.2))
        path.append(float(lam))
    assert np.all(np.diff(path) <= 0) and abs(path[-1] - 1.0) < 1e-3
    assert path[200] < 50 * math.exp(-0.5 * NU * 0.2 * 200)  # geometric decay while lambda >> 1
    assert float(update_multiplier(jnp.asarray(1.0), jnp.asarray(-0.3))) == 1.0


def _reference_rewo(distortions, rates, d0, calibration_steps=None, slack=0.05, after=None):
    """Alg. 1 transcribed: moving averages, (calibration: D0 and the multiplier it leaves),
    multiplier update, phase switch."""
    lam, d_hat, r_hat, phase, out = 1.0, None, None, True, []
    for i, (d, r) in enumerate(zip(distortions, rates, strict=True)):
        d_hat = d if d_hat is None else (1 - ALPHA) * d + ALPHA * d_hat
        r_hat = r if r_hat is None else (1 - ALPHA) * r + ALPHA * r_hat
        if calibration_steps is not None and d0 is None and i + 1 >= calibration_steps:
            d0 = d_hat + slack * abs(d_hat)
            if after == "ratio":
                lam = min(max(abs(r_hat) / abs(d_hat), 1.0), LAMBDA_BOUNDS[1])
        if d0 is not None:
            lam = _reference_update(lam, (d_hat - d0) / abs(d0))
            phase = phase and not d_hat <= d0
        out.append((lam, d_hat, np.nan if d0 is None else d0, phase))
    return out


@pytest.mark.parametrize(
    "d0, calibration, after", [(90.0, None, None), (None, 20, None), (None, 20, "ratio")]
)
def test_rewo_state_follows_algorithm_1(d0, calibration, after):
    steps = np.arange(80)
    distortions = 100.0 * np.exp(-steps / 40.0) + 5 * np.sin(steps)
    rates = 2000.0 + 50 * np.cos(steps)
    elbo = ConstrainedELBO(TraceRateDistortion(), d0, calibration_steps=calibration or 1,
                           lambda_after_calibration=after)  # fmt: skip
    update = jax.jit(elbo.update_aux)
    state, got = elbo.init_aux(), []
    for d, r in zip(distortions, rates, strict=True):
        state = update(state, {"distortion": jnp.asarray(d), "rate": jnp.asarray(r)})
        got.append((float(state.multiplier), float(state.distortion), float(state.d0),
                    bool(state.initial_phase)))  # fmt: skip
    expected = _reference_rewo(distortions, rates, d0, calibration, after=after)
    np.testing.assert_allclose([g[:3] for g in got], [e[:3] for e in expected], rtol=1e-12)
    assert [g[3] for g in got] == [e[3] for e in expected]
    phases = [g[3] for g in got]
    assert phases[0] and not phases[-1]  # the initial phase ends, once and for good
    if d0 is not None:
        assert max(g[0] for g in got) > 1.01  # lambda rose while the constraint was violated
    if calibration:
        assert all(g[0] == 1.0 for g in got[: calibration - 1])  # held during calibration
    if after == "ratio":  # the main phase starts from |R| / |D| and decays while D < D0
        assert got[calibration - 1][0] > 10 and got[-1][0] < got[calibration - 1][0]


# ---- the rate-distortion split ---------------------------------------------------------------


def test_trace_split_sums_to_the_numpyro_elbo_and_puts_observations_in_the_distortion():
    params = {"prior_loc": 0.5, "decoder_w": 0.3, "encoder_w": 0.1, "encoder_s": 1.0}
    key = jax.random.key(3)
    for inner, reference in (
        (TraceRateDistortion(), Trace_ELBO()),
        (TraceRateDistortion(TraceMeanField_ELBO(sum_sites=False)), TraceMeanField_ELBO()),
    ):
        out = inner.rate_distortion(key, params, model, guide, X, extra_factor=True)
        total = reference.loss(key, params, model, guide, X, extra_factor=True)
        np.testing.assert_allclose(out["distortion"] + out["rate"], total, rtol=1e-12)
        # the distortion is -log p(x | z) at the guide's sample (NumPyro seeds the guide with
        # the second half of the key), the factor belongs to the rate
        guide_key = jax.random.split(key)[1]
        z = handlers.trace(handlers.seed(guide, guide_key)).get_trace(X)["z"]["value"]
        log_lik = dist.Normal(0.3 * z, 0.1).log_prob(X).sum()
        np.testing.assert_allclose(out["distortion"], -log_lik, rtol=1e-12)
    named = TraceRateDistortion(distortion_sites=["x", "penalty"])
    out2 = named.rate_distortion(key, params, model, guide, X, extra_factor=True)
    np.testing.assert_allclose(out2["distortion"], -log_lik + 0.5 * 0.3**2, rtol=1e-12)
    with pytest.raises(ValueError, match="sum_sites=False"):
        TraceRateDistortion(Trace_ELBO())


# ---- constrained optimisation and annealing in training --------------------------------------


def test_initial_phase_trains_only_the_encoder_and_decoder_then_everything():
    """Calibrated D0 after 30 autoencoder updates (rate weight 0): until then ``prior_loc``
    (not encoder/decoder) does not move and lambda stays 1; afterwards the constraint holds,
    the main phase trains it."""
    elbo = ConstrainedELBO(TraceRateDistortion(), calibration_steps=30,
                           calibration_rate_weight=0.0)  # fmt: skip
    objective, state, metrics = train(elbo, 120)
    phase = metrics["initial_phase"]
    assert np.all(phase[:30] == 1.0) and np.all(phase[31:] == 0.0)
    assert np.all(metrics["lagrange_multiplier"][:31] == 1.0)
    assert np.all(metrics["rate_weight"][:30] == 0.0) and np.all(metrics["rate_weight"][31:] == 1)
    # a pure reconstruction phase: the distortion falls fast
    assert metrics["distortion"][29] < metrics["distortion"][0] - 100
    # replaying the first 30 updates confirms prior_loc frozen; the full run moved it
    _, early, _ = train(elbo, 30)
    assert float(early.params["prior_loc"]) == 0.5
    assert float(early.params["decoder_w"]) != 0.3 and float(early.params["encoder_w"]) != 0.1
    assert abs(float(state.params["prior_loc"]) - 0.5) > 1e-3
    # the main phase improves the ELBO (rate now counts) while D stays near D0
    assert metrics["elbo"][-10:].mean() > metrics["elbo"][31:41].mean()
    d0 = metrics["d0"][-1]
    assert np.all(metrics["distortion_avg"][-20:] < d0 + 0.1 * abs(d0))


def test_unreachable_constraint_raises_lambda_and_clip_after_restores_a_lower_bound():
    elbo = ConstrainedELBO(TraceRateDistortion(), d0=-1e4, clip_after=60)
    objective, state, metrics = train(elbo, 80)
    lam_raw = np.asarray(state.aux.elbo_state.multiplier)
    assert np.all(metrics["initial_phase"] == 1.0)  # never satisfied: never leaves it
    assert float(state.params["prior_loc"]) == 0.5
    assert lam_raw > 2.0 and np.all(np.diff(metrics["lagrange_multiplier"][:60]) > 0)
    assert np.all(metrics["lagrange_multiplier"][60:] == 1.0)  # clip(lambda, 0, 1) used
    np.testing.assert_allclose(  # loss = rate_weight R + lambda (D - D0) with lambda = 1
        metrics["loss"][60:], metrics["rate"][60:] + metrics["distortion"][60:] + 1e4, rtol=1e-9
    )


def test_annealing_weights_the_rate_by_the_schedule_and_ends_on_the_elbo():
    schedule = linear_warmup(40, beta_start=0.1)
    assert float(schedule(0)) == pytest.approx(0.1) and float(schedule(20)) == pytest.approx(0.55)
    assert float(schedule(40)) == 1.0 and float(schedule(1000)) == 1.0
    elbo = AnnealedELBO(TraceRateDistortion(), warmup_steps=40, beta_start=0.1)
    objective, state, metrics = train(elbo, 80)
    np.testing.assert_allclose(metrics["beta"], [float(schedule(i)) for i in range(80)])
    np.testing.assert_allclose(
        metrics["loss"], metrics["distortion"] + metrics["beta"] * metrics["rate"], rtol=1e-12
    )
    np.testing.assert_allclose(metrics["elbo"], -(metrics["distortion"] + metrics["rate"]))
    assert int(state.aux.elbo_state.step) == 80
    assert metrics["elbo"][-10:].mean() > metrics["elbo"][:10].mean() + 100


def test_bad_arguments_raise_clear_errors():
    inner = TraceRateDistortion()
    with pytest.raises(TypeError, match="rate_distortion"):
        ConstrainedELBO(Trace_ELBO())
    with pytest.raises(ValueError, match="finite"):
        ConstrainedELBO(inner, d0=float("nan"))
    with pytest.raises(ValueError, match="alpha"):
        ConstrainedELBO(inner, d0=1.0, alpha=1.0)
    with pytest.raises(ValueError, match="lambda_init"):
        ConstrainedELBO(inner, d0=1.0, lambda_init=0.0, lambda_bounds=(0.1, 10.0))
    with pytest.raises(ValueError, match="warmup_steps"):
        linear_warmup(-1)
    with pytest.raises(TypeError, match="rate_distortion"):
        AnnealedELBO(Trace_ELBO())
