"""The runnable examples, at small sizes: each is also a smoke test with real assertions."""

import numpy as np
from numpyro.infer import Trace_ELBO

from examples import kalman_demo, new_model_tutorial
from inference import compare, guides


def test_kalman_demo_fuses_sensors_and_smoothing_beats_filtering(tmp_path):
    out = kalman_demo.main(["--steps", "200", "--out", str(tmp_path)])
    assert out["rmse_smoothed"] < out["rmse_filtered"] < out["rmse_raw"]
    assert 0.85 < out["coverage_smoothed"] <= 1.0 and 0.85 < out["coverage_filtered"] <= 1.0
    assert out["sequential_vs_parallel"] < 1e-3
    assert (tmp_path / "kalman_demo.png").stat().st_size > 10_000


def test_new_model_tutorial_trains_every_guide_family(tmp_path):
    rows = new_model_tutorial.main(
        ["--steps", "60", "--sequences", "48", "--length", "12", "--out", str(tmp_path)]
    )
    by_guide = {r["guide"]: r for r in rows}
    assert set(by_guide) == {"kalman_smoothing", "backward_sampling", "filtering"}
    for r in rows:
        assert np.isfinite(r["elbo_mean"]) and np.isclose(r["elbo_mean"], r["recon"] - r["kl"])
    assert by_guide["filtering"]["train_elbo"] > by_guide["filtering"]["elbo_mean"] - 1e3


def test_tutorial_model_kalman_guides_are_one_posterior():
    """At the same parameters the forward- and backward-factorised Kalman posteriors are one
    distribution, so under Trace_ELBO their estimates agree within Monte Carlo error."""
    data, _ = new_model_tutorial.simulate(8, 10)
    rows = compare.compare(
        new_model_tutorial.pendulum_model,
        guides={"smoothing": guides.kalman_smoothing, "backward": guides.backward_sampling},
        elbos={"trace": Trace_ELBO()},
        data=data,
        train=False,
        eval_particles=64,
    )
    a, b = rows
    assert abs(a["elbo_mean"] - b["elbo_mean"]) < 4 * np.hypot(a["elbo_se"], b["elbo_se"])
