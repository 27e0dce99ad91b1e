"""The generic ELBO comparison, and the VRKN Figure-2 experiment built on it."""

import json
import shutil
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import Trace_ELBO, TraceMeanField_ELBO

from examples import elbo_comparison
from inference import compare
from inference.guides import (
    auxiliary,
    backward_sampling,
    closed_form_filtering,
    kalman_smoothing,
)
from pssm import cli
from pssm.auxiliary import auxiliary_lgssm, marginal_log_likelihood
from pssm.core import exact_log_likelihood
from pssm.lgssm import lgssm

D, P, T, N = 2, 3, 12, 6
A = np.array([[0.9, 0.2], [-0.15, 0.85]])
Q = np.array([[0.1, 0.02], [0.02, 0.05]])
H = np.array([[1.0, 0.0], [0.4, 1.0], [-0.5, 0.3]])
R = 0.3 * np.eye(P) + 0.05


def _simulate(rng):
    z = rng.normal(size=(N, D))
    path = [z]
    for _ in range(T - 1):
        z = z @ A.T + rng.multivariate_normal(np.zeros(D), Q, size=N)
        path.append(z)
    z = np.stack(path, 1)
    return z @ H.T + rng.multivariate_normal(np.zeros(P), R, size=(N, T))


@pytest.fixture(scope="module")
def evaluated():
    """Every pair at the true parameters (``train=False``)."""
    obs = jnp.asarray(_simulate(np.random.default_rng(0)))
    rows = compare.compare(
        lambda: lgssm(A, Q, H, R),
        {"smoothing": kalman_smoothing, "filtering": closed_form_filtering},
        {"trace": Trace_ELBO(), "meanfield": TraceMeanField_ELBO()},
        {"obs": obs},
        pairs=[("smoothing", "trace"), ("smoothing", "meanfield"), ("filtering", "meanfield")],
        train=False,
        eval_particles=64,
    )
    return {(r["guide"], r["elbo"]): r for r in rows}, obs


def test_exact_posterior_guide_attains_the_exact_log_likelihood(evaluated):
    rows, obs = evaluated
    exact = np.asarray(jax.jit(lambda o: exact_log_likelihood(lgssm(A, Q, H, R), {}, o))(obs))
    row = rows["smoothing", "trace"]
    np.testing.assert_allclose(row["log_lik"], exact.mean(), rtol=1e-12)
    np.testing.assert_allclose(row["log_lik_se"], exact.std(ddof=1) / np.sqrt(N), rtol=1e-12)
    # the guide is the exact posterior: every Trace_ELBO sample is log p(o)
    np.testing.assert_allclose(row["elbo_mean"], row["log_lik"], rtol=1e-6)
    assert row["elbo_se"] < 1e-8 and abs(row["gap"]) < 1e-6 * abs(row["log_lik"])
    assert row["params"] == {} and row["train_steps"] == 0 and row["eval_sequences"] == N


def test_mean_field_elbo_is_unbiased_and_the_filtering_bound_is_below(evaluated):
    rows, _ = evaluated
    mf, filt = rows["smoothing", "meanfield"], rows["filtering", "meanfield"]
    # per-step analytic KL at one sampled previous state: Monte Carlo, unbiased
    assert mf["elbo_se"] > 1e-3
    assert abs(mf["elbo_mean"] - mf["log_lik"]) < 4 * mf["elbo_se"]
    assert filt["elbo_mean"] < filt["log_lik"] - 4 * filt["elbo_se"]
    assert filt["gap"] > 0.1  # nats per sequence: the filtering guide ignores the future


def test_recon_minus_kl_is_the_elbo_of_each_estimator(evaluated):
    rows, _ = evaluated
    for row in rows.values():
        np.testing.assert_allclose(row["recon"] - row["kl"], row["elbo_mean"], rtol=1e-10)
    # the same samples: the reconstruction term does not depend on how KL is computed
    np.testing.assert_allclose(
        rows["smoothing", "trace"]["recon"], rows["smoothing", "meanfield"]["recon"], rtol=1e-12
    )
    assert rows["smoothing", "meanfield"]["kl"] > 0 and rows["filtering", "meanfield"]["kl"] > 0


class _OtherELBO(Trace_ELBO):
    """Not one of the estimators ``elbo_split`` reproduces: ``evaluate`` calls it."""


@pytest.mark.parametrize(
    "elbo", [TraceMeanField_ELBO(num_particles=2), _OtherELBO()], ids=["meanfield-2", "other"]
)
def test_evaluate_agrees_with_numpyros_estimator_particle_by_particle(evaluated, elbo):
    """The ELBO ``evaluate`` reports (from its own traces) is NumPyro's ``elbo.loss`` with the
    documented keys, to rounding."""
    _, obs = evaluated
    model = lgssm(A, Q, H, R)
    guide = closed_form_filtering(model)
    key, n = jax.random.PRNGKey(5), 6
    row = compare.evaluate(model, guide, elbo, {}, {"obs": obs}, key=key, num_particles=n)
    loss = jax.jit(lambda k: -elbo.loss(k, {}, model, guide, obs))
    reference = np.array([loss(k) for k in jax.random.split(key, n)]) / N
    assert reference.std() > 0.01  # Monte Carlo: the keys matter
    np.testing.assert_allclose(row["elbo_mean"], reference.mean(), rtol=1e-10)
    np.testing.assert_allclose(row["elbo_se"], reference.std(ddof=1) / np.sqrt(n), rtol=1e-6)
    np.testing.assert_allclose(row["recon"] - row["kl"], row["elbo_mean"], rtol=1e-10)


def test_table_json_and_plot(evaluated, tmp_path):
    rows = list(evaluated[0].values())
    table = compare.markdown_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows) and lines[0].startswith("| guide | ELBO")
    assert f"{rows[0]['elbo_mean']:.4g} ± " in lines[2]
    compare.save(rows, tmp_path, name="cmp")
    assert json.loads((tmp_path / "cmp.json").read_text()) == rows
    assert (tmp_path / "cmp.md").read_text().strip() == table
    png = compare.plot(rows, tmp_path / "cmp.png")
    assert png.stat().st_size > 1000


def test_factory_detection():
    assert compare._is_factory(lambda: None)
    assert not compare._is_factory(lgssm(A, Q, H, R))
    assert not compare._is_factory(lambda obs=None: None)  # a model whose data default to None


def _counted(family, calls: Counter, name: str):
    """The guide family ``family``, counting its calls (one per pair run) in ``calls[name]``."""

    def build(model):
        calls[name] += 1
        return family(model)

    return build


def _train_every_pair(run_dir, calls: Counter) -> list[dict]:
    """Two updates of ``A`` per pair on 6 sequences: the auxiliary family does not apply to an
    LGSSM, backward sampling orders its sites against the model (NumPyro's mean-field warning),
    Kalman smoothing is clean."""
    families = {
        "auxiliary": auxiliary,
        "backward": backward_sampling,
        "smoothing": kalman_smoothing,
    }
    return compare.compare(
        lambda: lgssm(A, Q, H, R, learn=("A",)),
        {name: _counted(family, calls, name) for name, family in families.items()},
        {"meanfield": TraceMeanField_ELBO()},
        {"obs": jnp.asarray(_simulate(np.random.default_rng(2)))},
        num_steps=2,
        steps_per_call=2,
        eval_particles=2,
        run_dir=run_dir,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("compare_run")
    calls = Counter()
    return _train_every_pair(run_dir, calls), calls, run_dir


_MEAN_FIELD = "UserWarning: Failed to verify mean field restriction on the guide."


def test_a_failing_pair_is_a_row_and_the_others_complete(trained):
    rows, calls, run_dir = trained
    aux, backward, smoothing = rows
    assert calls == {"auxiliary": 1, "backward": 1, "smoothing": 1}
    assert aux["failure"].startswith("TypeError: the auxiliary guide needs a model carrying")
    assert "\n" not in aux["failure"] and aux["elbo_mean"] is None and aux["params"] == {}
    assert not (run_dir / "auxiliary-meanfield").exists()  # failed: nothing stored to resume
    for row in backward, smoothing:  # trained after the failure
        assert row["failure"] is None and row["train_steps"] == 2
        assert np.isfinite(row["elbo_mean"]) and np.isfinite(row["train_elbo"])
        assert not np.allclose(row["params"]["A"], A)  # A moved
    table = compare.markdown_table(rows).splitlines()
    assert table[0].endswith("| notes |") and len(table) == 5
    assert "| auxiliary | meanfield | – |" in table[2]
    assert f"failed: {aux['failure']}" in table[2]


def test_a_pairs_warnings_are_in_its_row_once(trained):
    _, backward, smoothing = trained[0]
    mean_field = [w for w in backward["warnings"] if w.startswith(_MEAN_FIELD)]
    # raised at each trace of NumPyro's loss: recorded once, on one line, with the site orders
    assert mean_field == [
        f"{_MEAN_FIELD} To eliminate this warning, ensure model and guide sites occur in the "
        "same order. Model sites: z_0 z Guide sites: z z_0"
    ]
    assert not any(w.startswith(_MEAN_FIELD) for w in smoothing["warnings"])
    assert len(set(backward["warnings"])) == len(backward["warnings"])
    assert f"warning: {mean_field[0]}" in compare.markdown_table(trained[0]).splitlines()[3]


def test_a_run_dir_is_resumed_not_retrained(trained, tmp_path):
    rows, _, original = trained
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    metrics = (run_dir / "smoothing-meanfield" / "metrics.jsonl").read_text()
    assert len(metrics.splitlines()) == 2

    calls = Counter()
    again = _train_every_pair(run_dir, calls)
    assert calls == {"auxiliary": 1}  # failed pairs run again, finished ones are read back
    assert again[1:] == rows[1:]  # including their stored seconds
    assert again[0]["failure"] == rows[0]["failure"]

    # a pair lost entirely is trained anew; one whose row was lost after training (an old
    # run_dir, or a run stopped before its row was written) is evaluated at its checkpoint
    shutil.rmtree(run_dir / "backward-meanfield")
    (run_dir / "smoothing-meanfield" / compare.ROW_FILE).unlink()
    calls = Counter()
    again = _train_every_pair(run_dir, calls)
    assert calls == {"auxiliary": 1, "backward": 1, "smoothing": 1}
    assert (run_dir / "smoothing-meanfield" / "metrics.jsonl").read_text() == metrics  # no update
    assert len((run_dir / "backward-meanfield" / "metrics.jsonl").read_text().splitlines()) == 2
    for new, old in zip(again[1:], rows[1:], strict=True):  # deterministic on CPU
        assert {**new, "seconds": 0} == {**old, "seconds": 0}
    assert (run_dir / "backward-meanfield" / compare.ROW_FILE).exists()


def _check_figure2(result, sigma_tol, filtering_factor):
    smooth, filt = result["rows"]
    assert smooth["guide"].startswith("smoothing") and filt["guide"].startswith("filtering")
    assert abs(smooth["sigma"] - 0.01) < sigma_tol * 0.01  # recovers the transition variance
    assert filt["sigma"] > filtering_factor * 0.01  # the RSSM bound over-estimates it
    assert smooth["error_A"] < filt["error_A"]  # and A is closer to the truth
    assert smooth["log_lik"] > filt["log_lik"]  # so the learned model explains held-out data
    truth = result["truth"]["held_out_log_lik"]
    assert smooth["log_lik"] > truth - 0.5  # near the true model's (per sequence)


def test_figure2_reduced_via_the_cli(tmp_path, capsys):
    """A reduced Figure-2 run through ``pssm compare`` (100 sequences of 25 steps, 300 updates):
    the bounds already separate clearly."""
    cli.main(
        [
            "compare",
            "--sequences",
            "100",
            "--length",
            "25",
            "--held-out",
            "50",
            "--steps",
            "300",
            "--lr",
            "0.03",
            "--particles",
            "4",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    _check_figure2(summary, sigma_tol=0.3, filtering_factor=2.0)
    assert summary["settings"]["num_sequences"] == 100 and len(summary["rows"]) == 2
    printed = capsys.readouterr().out
    assert "| smoothing (SSM) |" in printed and "[ok] smoothing sigma" in printed
    assert (tmp_path / "table.md").exists() and (tmp_path / "elbo_comparison.png").exists()


@pytest.mark.slow
def test_figure2_full_size():
    """The paper's setting: 1000 sequences of length 50."""
    result = elbo_comparison.run(out=None, progress=False)
    assert all(result["claims"].values()), result["claims"]
    _check_figure2(result, sigma_tol=0.2, filtering_factor=2.0)


def test_log_likelihood_dispatch():
    """Exact models, models with a marginal LGSSM (linear-decoder auxiliary model), none."""
    obs = jnp.asarray(_simulate(np.random.default_rng(1)))
    model = lgssm(A, Q, H, R)
    np.testing.assert_array_equal(
        compare.log_likelihood(model, {}, obs=obs), exact_log_likelihood(model, {}, obs)
    )
    C = np.array([[1.0, 0.2, 0.0], [0.0, 1.0, 0.5]]).T  # p = 3 observations of p_a = 2
    aux = auxiliary_lgssm(A, Q, np.eye(2), 0.1 * np.eye(2), C=C, S=0.05 * np.eye(P))
    np.testing.assert_array_equal(
        compare.log_likelihood(aux, {}, obs=obs), marginal_log_likelihood(aux, {}, obs)
    )
    mlp = auxiliary_lgssm(A, Q, np.eye(2), 0.1 * np.eye(2), decoder="mlp", obs_dim=P)
    assert compare.log_likelihood(mlp, {}, obs=obs) is None
