"""Tests of inference.training: convergence to a closed-form posterior, invariance to how the
steps are grouped into compiled calls, exact checkpoint/resume, interrupts, errors, and
data-parallel sharding over two (virtual CPU) devices."""

import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from hypothesis import strategies as st
from numpyro.distributions import constraints
from numpyro.infer import Trace_ELBO, TraceMeanField_ELBO
from numpyro.infer.elbo import ELBO

from inference import training

# Gaussian mean with known variance: mu ~ N(M0, S0^2), x_i | mu ~ N(mu, SIGMA^2), i = 1..N.
M0, S0, SIGMA, N = 0.5, 2.0, 1.5, 40


def model(obs, num_data):
    """``obs`` is a minibatch of the ``num_data`` observations: its log-likelihood is scaled by
    ``num_data / len(obs)``, an unbiased estimate of the full-data one."""
    mu = numpyro.sample("mu", dist.Normal(M0, S0))
    with numpyro.plate("data", obs.shape[0]), numpyro.handlers.scale(scale=num_data / obs.shape[0]):
        numpyro.sample("obs", dist.Normal(mu, SIGMA), obs=obs)


def guide(obs, num_data):
    loc = numpyro.param("loc", 0.0)
    scale = numpyro.param("scale", 1.0, constraint=constraints.positive)
    numpyro.sample("mu", dist.Normal(loc, scale))


def counting_model(obs, num_data):
    """The model above plus a ``numpyro.mutable`` counter of its evaluations."""
    counter = numpyro.primitives.mutable("counter", {"n": jnp.zeros(())})
    counter["n"] = counter["n"] + 1.0
    model(obs, num_data)


@pytest.fixture(scope="module")
def obs():
    return 1.3 + SIGMA * jax.random.normal(jax.random.key(1), (N,))


@pytest.fixture(scope="module")
def objective():
    return training.elbo_objective(model, guide, Trace_ELBO(), num_data=N)


def analytic_posterior(x):
    precision = 1 / S0**2 + x.shape[0] / SIGMA**2
    mean = (M0 / S0**2 + x.sum() / SIGMA**2) / precision
    return mean, precision**-0.5


def log_evidence(x):
    cov = SIGMA**2 * np.eye(x.shape[0]) + S0**2 * np.ones((x.shape[0],) * 2)
    diff = np.asarray(x) - M0
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (diff @ np.linalg.solve(cov, diff) + logdet + x.shape[0] * np.log(2 * np.pi))


def _numpy(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def assert_trees_equal(a, b):
    """Bitwise equality of two pytrees of the same structure (PRNG keys compared by data)."""
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(_numpy(x), _numpy(y)), a, b)


ADAM = optax.adam(0.05)  # one object, so that fit reuses its compiled loop across tests


def _fit(objective, obs, **kwargs):
    defaults = {"num_steps": 20, "batch_size": 8, "key": jax.random.key(0), "progress": False}
    return training.fit(objective, {"obs": obs}, ADAM, **(defaults | kwargs))


def test_reaches_analytic_posterior_and_evidence(obs):
    """Full-batch Trace_ELBO with a decaying step size: the Normal guide reaches the conjugate
    posterior, and at the optimum the ELBO equals log p(x) (with q the posterior,
    log p(x, mu) - log q(mu) = log p(x) for every mu: the estimator has no Monte Carlo error)."""
    objective = training.elbo_objective(model, guide, Trace_ELBO(8), num_data=N)
    optimizer = optax.adam(optax.exponential_decay(0.1, 600, 0.01))
    state, history = training.fit(
        objective, {"obs": obs}, optimizer, num_steps=600, batch_size=N,
        steps_per_call=150, key=jax.random.key(0), progress=False,
    )  # fmt: skip
    mean, std = analytic_posterior(obs)
    values = objective.constrain(state.params)
    assert abs(values["loc"] - mean) < 0.05 * std
    assert abs(values["scale"] / std - 1) < 0.03
    assert [r["step"] for r in history] == list(range(1, 601))
    assert all(r["elbo"] == -r["loss"] for r in history)
    last_elbos = np.array([r["elbo"] for r in history[-100:]])
    assert abs(last_elbos.mean() - log_evidence(obs)) < 5e-3
    assert history[0]["loss"] > history[-1]["loss"] + 1.0


def test_minibatch_optimum_is_the_full_data_posterior(obs):
    """Minibatches of 10 out of 40 with plate subsampling: an unbiased ELBO, same optimum."""
    objective = training.elbo_objective(model, guide, TraceMeanField_ELBO(8), num_data=N)
    optimizer = optax.adam(optax.exponential_decay(0.03, 600, 0.02))
    state, _ = training.fit(
        objective, {"obs": obs}, optimizer, num_steps=1200, batch_size=10,
        steps_per_call=300, key=jax.random.key(3), progress=False,
    )  # fmt: skip
    mean, std = analytic_posterior(obs)
    values = objective.constrain(state.params)
    assert abs(values["loc"] - mean) < 0.1 * std
    assert abs(values["scale"] / std - 1) < 0.1


def test_result_does_not_depend_on_steps_per_call(objective, obs):
    state_1, history_1 = _fit(objective, obs, num_steps=12, steps_per_call=1)
    state_5, history_5 = _fit(objective, obs, num_steps=12, steps_per_call=5)
    assert_trees_equal(state_1, state_5)
    assert history_1 == history_5
    assert int(state_5.step) == 12 and len(history_5) == 12
    # the pure function behind fit, jitted by hand with a static number of steps
    run = jax.jit(
        functools.partial(training.train_steps, objective, ADAM, num_steps=12, batch_size=8)
    )
    initial = training.init_train_state(objective, ADAM, jax.random.key(0), {"obs": obs[:8]})
    state, metrics = run(initial, {"obs": obs})
    assert_trees_equal(state, state_5)
    np.testing.assert_array_equal(metrics["loss"], [r["loss"] for r in history_5])


def _read_jsonl(run_dir):
    return [
        json.loads(line)
        for line in (Path(run_dir) / "metrics.jsonl").read_text().split("\n")
        if line
    ]


def test_resume_equals_uninterrupted_run(objective, obs, tmp_path):
    full_state, full_history = _fit(
        objective, obs, run_dir=tmp_path / "full", checkpoint_every=5, steps_per_call=3
    )
    half_dir = tmp_path / "half"
    _fit(objective, obs, num_steps=10, run_dir=half_dir, checkpoint_every=5, steps_per_call=3)
    state, history = _fit(
        objective, obs, run_dir=half_dir, checkpoint_every=5, steps_per_call=4, resume=True
    )
    assert_trees_equal(state, full_state)
    assert history == full_history
    assert _read_jsonl(half_dir) == full_history == _read_jsonl(tmp_path / "full")
    # a resumed run that is already done does nothing and returns the stored history
    again, history = _fit(objective, obs, run_dir=half_dir, resume=True)
    assert_trees_equal(again, full_state)
    assert history == full_history
    # restore() reads the final checkpoint into a template of the same structure
    template = training.init_train_state(objective, ADAM, jax.random.key(9), {"obs": obs[:8]})
    assert_trees_equal(training.restore(half_dir, template), full_state)


def test_resume_after_lost_checkpoint_truncates_metrics(objective, obs, tmp_path):
    """A process killed after step 10 was logged but before its checkpoint was written: resume
    continues from step 8 and the metrics file keeps every step exactly once."""
    full_state, full_history = _fit(objective, obs)
    _fit(objective, obs, num_steps=10, run_dir=tmp_path, checkpoint_every=4)
    shutil.rmtree(tmp_path / "checkpoints" / "10")
    assert [r["step"] for r in _read_jsonl(tmp_path)] == list(range(1, 11))
    state, history = _fit(objective, obs, run_dir=tmp_path, checkpoint_every=4, resume=True)
    assert_trees_equal(state, full_state)
    assert history == full_history == _read_jsonl(tmp_path)


def test_keyboard_interrupt_leaves_a_usable_checkpoint(objective, obs, tmp_path):
    full_state, full_history = _fit(objective, obs)

    def interrupt(state, records):
        if int(state.step) >= 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(objective, obs, run_dir=tmp_path, steps_per_call=4, callback=interrupt)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [8]
    assert [r["step"] for r in _read_jsonl(tmp_path)] == list(range(1, 9))
    state, history = _fit(objective, obs, run_dir=tmp_path, resume=True)
    assert_trees_equal(state, full_state)
    assert history == full_history


def test_callback_can_stop_and_state_continues(objective, obs):
    full_state, full_history = _fit(objective, obs)
    half, first = _fit(objective, obs, steps_per_call=5, callback=lambda s, r: int(s.step) >= 10)
    assert int(half.step) == 10
    state, second = _fit(objective, obs, state=half, key=None)
    assert_trees_equal(state, full_state)
    assert first + second == full_history


def _poisoned_objective(bad_step):
    """Quadratic loss that turns NaN at update ``bad_step`` (1-based), counted in ``aux``."""

    def init(key, batch):
        return {"w": jnp.ones(2)}, jnp.zeros((), jnp.int32)

    def loss(params, aux, key, batch):
        value = jnp.sum((params["w"] - batch["y"].mean(0)) ** 2)
        value = jnp.where(aux + 1 >= bad_step, jnp.nan, value)
        return value, {"count": aux, "w": params["w"]}, aux

    return training.Objective(init, loss, lambda p: p, lambda aux, params, metrics: aux + 1)


def test_non_finite_loss_raises_after_checkpointing_last_finite_state(tmp_path):
    data = {"y": jnp.arange(12.0).reshape(6, 2)}
    sgd = optax.sgd(0.1)
    fit = lambda objective, **kw: training.fit(
        objective, data, sgd, **{"num_steps": 12, "batch_size": 3, "steps_per_call": 4,
        "key": jax.random.key(0), "progress": False, **kw},
    )  # fmt: skip
    with pytest.raises(training.NonFiniteLossError, match="step 7") as info:
        fit(_poisoned_objective(7), run_dir=tmp_path)
    error = info.value
    assert error.step == 7 and np.isnan(error.metrics["loss"])
    assert error.last_metrics["step"] == 6 and error.last_metrics["count"] == 5
    assert int(error.state.step) == 6
    clean, history = fit(_poisoned_objective(100), num_steps=6)
    assert_trees_equal(error.state, clean)
    assert _read_jsonl(tmp_path) == history
    np.testing.assert_array_equal(history[-1]["w"], error.last_metrics["w"])  # vector metric
    assert len(history[-1]["w"]) == 2
    template = training.init_train_state(_poisoned_objective(7), sgd, jax.random.key(0), data)
    assert_trees_equal(training.restore(tmp_path, template), clean)


def test_mutable_state_and_metrics_protocol(obs):
    """NumPyro mutable sites are threaded through the steps; a MetricsELBO wrapper's metrics
    and its own state (init_aux / update_aux) reach the loop."""

    class ScaledELBO(ELBO):
        def __init__(self, beta):
            super().__init__()
            self.beta, self.inner = beta, Trace_ELBO()

        def init_aux(self):
            return jnp.zeros(())

        def update_aux(self, aux, metrics):
            return aux + 1.0

        def loss_with_metrics(self, rng_key, param_map, model, guide, *args, aux, **kwargs):
            out = self.inner.loss_with_mutable_state(rng_key, param_map, model, guide, **kwargs)
            metrics = {"elbo": -out["loss"], "updates_seen": aux}
            return {**out, "loss": self.beta * out["loss"], "metrics": metrics}

    objective = training.elbo_objective(counting_model, guide, ScaledELBO(0.5), num_data=N)
    assert isinstance(ScaledELBO(0.5), training.MetricsELBO)
    state, history = _fit(objective, obs, num_steps=9, steps_per_call=4)
    # one model run in SVI.init (numpyro keeps its mutable value), then one per update
    assert state.aux.mutable_state == {"counter": {"n": 1.0 + 9}}
    assert float(state.aux.elbo_state) == 9.0
    assert [r["updates_seen"] for r in history] == list(range(9))
    for record in history:
        assert record["loss"] == 0.5 * -record["elbo"]
    # the same updates as the plain objective scaled by 1/2 (Adam is scale-invariant)
    plain_state, plain_history = _fit(
        training.elbo_objective(counting_model, guide, Trace_ELBO(), num_data=N),
        obs, num_steps=9, steps_per_call=4,
    )  # fmt: skip
    np.testing.assert_allclose(state.params["loc"], plain_state.params["loc"], rtol=1e-6)
    np.testing.assert_allclose(
        [r["elbo"] for r in history], [r["elbo"] for r in plain_history], rtol=1e-6
    )


def test_clear_errors(objective, obs, tmp_path):
    with pytest.raises(ValueError, match="batch_size=41"):
        _fit(objective, obs, batch_size=41)
    with pytest.raises(ValueError, match="common leading axis"):
        training.fit(
            objective, {"obs": obs, "actions": jnp.zeros((N - 1, 2))}, optax.adam(0.1),
            num_steps=1, batch_size=4, key=jax.random.key(0), progress=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="needs the run_dir"):
        _fit(objective, obs, resume=True)
    with pytest.raises(ValueError, match="needs `key`"):
        _fit(objective, obs, key=None)
    _fit(objective, obs, num_steps=2, run_dir=tmp_path)
    with pytest.raises(FileExistsError, match="resume=True"):
        _fit(objective, obs, num_steps=2, run_dir=tmp_path)
    other = training.elbo_objective(counting_model, guide, Trace_ELBO(), num_data=N)
    with pytest.raises(ValueError, match="does not match"):
        _fit(other, obs, num_steps=4, run_dir=tmp_path, resume=True)


SHARDING_CHILD = textwrap.dedent(
    """
    import functools, jax, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    assert len(jax.devices()) == 2, jax.devices()
    from tests.test_training import N, guide, model
    from inference import training
    from numpyro.infer import Trace_ELBO
    obs = 1.3 + 1.5 * jax.random.normal(jax.random.key(1), (N,))
    objective = training.elbo_objective(model, guide, Trace_ELBO(), num_data=N)
    kwargs = dict(num_steps=30, batch_size=8, steps_per_call=10, key=jax.random.key(0),
                  progress=False)
    adam = optax.adam(0.05)
    one, h1 = training.fit(objective, {"obs": obs}, adam, devices=jax.devices()[:1], **kwargs)
    two, h2 = training.fit(objective, {"obs": obs}, adam, **kwargs)
    assert two.params["loc"].sharding.device_set == set(jax.devices())
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10)
    np.testing.assert_allclose([r["loss"] for r in h1], [r["loss"] for r in h2], rtol=1e-10)
    assert not np.array_equal(np.asarray(one.params["loc"]), 0.0)
    # the compiled step splits the minibatch over the devices and all-reduces the gradient
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    run = jax.jit(functools.partial(
        training.train_steps, objective, adam, num_steps=2, batch_size=8,
        batch_sharding=NamedSharding(mesh, PartitionSpec("batch"))))
    replicated = NamedSharding(mesh, PartitionSpec())
    args = jax.device_put((one, {"obs": obs}), replicated)
    assert "all-reduce" in run.lower(*args).compile().as_text()
    try:
        training.fit(objective, {"obs": obs}, adam, **{**kwargs, "batch_size": 7})
    except ValueError as error:
        assert "multiple of the 2 devices" in str(error)
    else:
        raise AssertionError("odd batch over 2 devices accepted")
    print("OK")
    """
)


def test_two_device_sharding_matches_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", SHARDING_CHILD], env=env, cwd=root, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("OK")


# --- best of several starts ---------------------------------------------------------------------


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.lists(st.sampled_from([-3.0, -1.0, 0.0, 2.5, 7.0, np.nan, np.inf, -np.inf]),
                           min_size=1, max_size=6))  # fmt: skip
def test_best_start_keeps_the_first_highest_finite_score(scores):
    """Every candidate is screened once, in order; the best is the first highest finite score
    (a naive loop over the list), and no finite score at all is an error that names them."""
    screened = []

    def screen(c):
        screened.append(c)
        return ("run", c)

    candidates = training.restart_seeds(7, len(scores))
    assert candidates == [7 + 1000 * k for k in range(len(scores))]
    score = lambda run: scores[candidates.index(run[1])]
    finite = [k for k, s in enumerate(scores) if np.isfinite(s)]
    if not finite:
        with pytest.raises(FloatingPointError, match="no candidate"):
            training.best_start(candidates, screen, score)
        return
    best, run, got = training.best_start(candidates, screen, score)
    expected = min(finite, key=lambda k: (-scores[k], k))
    assert screened == candidates
    assert best == expected and run == ("run", candidates[expected])
    np.testing.assert_array_equal([r["validation_bound"] for r in got], scores)
    assert [r["seed"] for r in got] == candidates
    assert [r["selected"] for r in got] == [k == expected for k in range(len(scores))]


def test_best_start_and_structure_checks_refuse_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        training.best_start([], lambda c: c, lambda r: 0.0)
    training.check_same_structure({"a": np.zeros(2)}, {"a": np.ones(2)}, "x")
    with pytest.raises(ValueError, match="seed 7 builds parameters"):
        training.check_same_structure({"a": np.zeros(2)}, {"a": np.zeros(3)}, "seed 7")
    with pytest.raises(ValueError, match="names or shapes"):
        training.check_same_structure({"a": np.zeros(2)}, {"b": np.zeros(2)}, "seed 7")
    training.check_screening(1, 0, 10)  # one start: nothing screened
    training.check_screening(3, 10, 10)
    with pytest.raises(ValueError, match="restarts=0"):
        training.check_screening(0, 5, 10)
    for bad in (0, 11):
        with pytest.raises(ValueError, match=f"screen_steps={bad} <= steps=10"):
            training.check_screening(3, bad, 10)


def test_cache_per_objective_builds_once_per_hashable_key_and_always_for_unhashable_ones():
    """The compiled-function builders of the loop and of ``heldout_elbo`` share one cache rule:
    a hashable objective is built once per argument tuple; an unhashable one (here a dict) is
    built on every call, with the same result, rather than failing."""
    from inference.training.objective import cache_per_objective

    built = []

    @cache_per_objective(maxsize=4)
    def build(objective, n):
        built.append((objective if not isinstance(objective, dict) else "dict", n))
        return (repr(objective), n)

    assert build("a", 1) == build("a", 1) == ("'a'", 1)
    assert build("a", 2) == ("'a'", 2)
    assert build({"x": 1}, 1) == build({"x": 1}, 1) == ("{'x': 1}", 1)
    assert built == [("a", 1), ("a", 2), ("dict", 1), ("dict", 1)]
    assert build.cache_info().currsize == 2
