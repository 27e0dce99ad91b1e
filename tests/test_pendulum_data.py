"""The pendulum image set: determinism, physics against an independent integrator, rendering
geometry recovered from image moments, and the cache."""

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from pssm import datasets


def _rhs(u):
    return lambda t, s: [s[1], 15.0 * np.sin(s[0]) + 3.0 * u]  # 3g/(2l) = 15, 3/(m l^2) = 3


def test_same_seed_same_data_other_seed_other_data():
    a = datasets.pendulum_images(6, 5, seed=3, controls=True, cache=False)
    b = datasets.pendulum_images(6, 5, seed=3, controls=True, cache=False)
    c = datasets.pendulum_images(6, 5, seed=4, controls=True, cache=False)
    for k in ("images", "states", "actions"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.allclose(a["states"], c["states"])
    assert a["images"].shape == (6, 5, 16, 16, 1) and a["images"].dtype == np.float32
    assert a["states"].shape == (6, 5, 2) and a["actions"].shape == (6, 5, 1)
    assert a["images"].min() == 0.0 and a["images"].max() == 1.0
    assert np.all(np.abs(a["actions"]) <= 2.0)
    assert np.all((a["states"][..., 0] >= -np.pi) & (a["states"][..., 0] < np.pi))
    assert "actions" not in datasets.pendulum_images(2, 3, cache=False)


def test_states_match_a_high_accuracy_reference_with_piecewise_constant_torques():
    """scipy's adaptive Dormand-Prince (rtol 1e-11) from each frame's torque interval."""
    data = datasets.pendulum_images(8, 15, seed=1, controls=True, cache=False)
    states, actions = data["states"].astype(np.float64), data["actions"][..., 0]
    for n in range(8):
        s = states[n, 0].copy()
        for t in range(14):
            sol = solve_ivp(_rhs(actions[n, t]), (0, 0.05), s, rtol=1e-11, atol=1e-12)
            s = sol.y[:, -1]
            err_theta = datasets.wrap_angle(s[0] - states[n, t + 1, 0])
            # float32 storage (~5e-7 relative) propagated over <= 14 steps
            assert abs(err_theta) < 1e-4 and abs(s[1] - states[n, t + 1, 1]) < 1e-4


def test_rk4_float64_matches_reference_and_conserves_energy_without_torque():
    rng = np.random.default_rng(0)
    theta0, omega0 = rng.uniform(-np.pi, np.pi, 5), rng.uniform(-1, 1, 5)
    T = 200  # 10 s: several swings and full rotations
    path = datasets.simulate_pendulum(theta0, omega0, np.zeros((5, T)))
    energy = datasets.pendulum_energy(path[..., 0], path[..., 1])
    assert np.max(np.abs(energy - energy[:, :1])) < 1e-7  # E ~ 15: relative ~1e-8
    for n in range(5):
        ref = solve_ivp(
            _rhs(0.0), (0, 0.05 * (T - 1)), [theta0[n], omega0[n]],
            t_eval=0.05 * np.arange(T), rtol=1e-12, atol=1e-12,
        )  # fmt: skip
        assert np.max(np.abs(ref.y.T - path[n])) < 1e-6
    # energy of the stored (float32) data set is conserved to storage precision
    data = datasets.pendulum_images(10, 15, seed=2, cache=False)
    e = datasets.pendulum_energy(*np.moveaxis(data["states"].astype(np.float64), -1, 0))
    assert np.max(np.abs(e - e[:, :1])) < 1e-4


def _moment_angle(frames):
    """Angle of the intensity centroid about the pivot (x right, y up): atan2(-x, y)."""
    size = frames.shape[-1]
    c = np.arange(size) + 0.5 - size / 2
    x, y = np.meshgrid(c, -c)
    mass = frames.sum((-2, -1))
    cx, cy = (frames * x).sum((-2, -1)) / mass, (frames * y).sum((-2, -1)) / mass
    return np.arctan2(-cx, cy), np.hypot(cx, cy)


@pytest.mark.parametrize("size", [16, 32])
def test_rendered_rod_rotates_with_the_angle(size):
    theta = np.linspace(-np.pi, np.pi, 73)[:-1]
    frames = datasets.render_pendulum(theta, size)
    recovered, radius = _moment_angle(frames)
    err = np.degrees(np.abs(datasets.wrap_angle(recovered - theta)))
    assert err.max() < 1.0, err.max()  # measured: 0.36 deg at 16 px, 0.11 at 32
    # centroid near half the rod (the round cap at the pivot pulls it in slightly)
    half = 0.5 * datasets.ROD_LENGTH * size
    assert np.all(np.abs(radius - half) < 0.25 * half)
    # anti-aliasing: the rod's area barely depends on its direction, and edges are fractional
    area = frames.sum((-2, -1))
    assert area.std() / area.mean() < 0.03
    assert np.any((frames > 0.05) & (frames < 0.95))
    # upright (theta = 0): only rows above the centre are lit, mirror-symmetric left/right
    up = datasets.render_pendulum(0.0, size)
    assert up[size // 2 + 2 :].sum() == 0 and np.allclose(up, up[:, ::-1])


def test_images_are_renders_of_the_states():
    data = datasets.pendulum_images(3, 4, seed=5, cache=False)
    np.testing.assert_array_equal(
        data["images"][..., 0], datasets.render_pendulum(data["states"][..., 0])
    )


def test_cache_round_trip(tmp_path):
    kwargs = dict(num_sequences=4, length=3, seed=7, controls=True, cache_dir=tmp_path)
    first = datasets.pendulum_images(**kwargs)
    path = tmp_path / f"pendulum_{first['metadata']['key']}.npz"
    assert first["metadata"]["cache_path"] == str(path) and path.exists()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["config"]["num_sequences"] == 4 and meta["config"]["controls"] is True
    second = datasets.pendulum_images(**kwargs)
    for k in ("images", "states", "actions"):
        np.testing.assert_array_equal(first[k], second[k])
    # the second call read the file: a marked file comes back marked
    np.savez_compressed(path, **{**{k: first[k] for k in ("states", "actions")},
                                 "images": first["images"] + 1.0})  # fmt: skip
    np.testing.assert_array_equal(datasets.pendulum_images(**kwargs)["images"], first["images"] + 1)
    # another configuration has another key; a damaged file is regenerated
    assert datasets.pendulum_images(**{**kwargs, "seed": 8})["metadata"]["key"] != meta["key"]
    path.write_bytes(b"not a zip file")
    np.testing.assert_array_equal(datasets.pendulum_images(**kwargs)["images"], first["images"])


def test_flat_views_and_bad_input():
    data = datasets.pendulum_images(2, 3, controls=True, cache=False)
    flat = datasets.flatten_images(data["images"])
    assert flat.shape == (2, 3, 256)
    np.testing.assert_array_equal(datasets.unflatten_images(flat, 16), data["images"])
    np.testing.assert_array_equal(flat[1, 2], data["images"][1, 2].ravel())
    batch = datasets.model_data(data)
    assert batch["obs"].shape == (2, 3, 256) and batch["actions"].shape == (2, 3, 1)
    with pytest.raises(ValueError, match="num_sequences"):
        datasets.pendulum_images(0, cache=False)
    with pytest.raises(ValueError, match="size"):
        datasets.pendulum_images(2, 3, size=2, cache=False)
    with pytest.raises(ValueError, match="expected"):
        datasets.flatten_images(flat)


# ---- the system-identification example ---------------------------------------------------------


def _example_args(**overrides):
    import argparse

    from examples import pendulum_sysid

    parser = argparse.ArgumentParser()
    pendulum_sysid.add_arguments(parser)
    args = parser.parse_args(["--quick"])
    for k, v in {**pendulum_sysid.QUICK, **overrides}.items():
        setattr(args, k, v)
    args.action_dim = 1 if args.controls else 0
    return args


def test_open_loop_prediction_sees_only_the_context(controls=True):
    """The generic forecast (guide prefix substituted into the model, the rest from the prior)
    must not read frames after the prefix, also for a model whose transitions depend on the
    observed frames (locally_linear); changing a context frame does change it."""
    import jax.numpy as jnp
    from numpyro import handlers

    from examples import pendulum_sysid

    args = _example_args(controls=controls)
    entry = pendulum_sysid.build_locally_linear(args)
    data = datasets.pendulum_images(4, 6, seed=9, controls=controls, cache=False)
    batch = {k: jnp.asarray(v, float) for k, v in datasets.model_data(data).items()}

    # the initial (constrained) parameters: the model's param sites (the guide shares them)
    def init(b):
        tr = handlers.trace(handlers.seed(entry.model, 0)).get_trace(**b)
        return {k: v["value"] for k, v in tr.items() if v["type"] == "param"}

    params = jax.jit(init)(batch)

    @functools.partial(jax.jit, static_argnums=1)
    def predict(b, keep):
        start = pendulum_sysid.start_belief(
            entry, params, jax.random.key(1), b, context=3, keep=keep
        )
        actions = b["actions"][:, keep:] if controls else None
        return pendulum_sysid.predictor(entry, 6 - keep)(params, jax.random.key(2), start, actions)

    future = {**batch, "obs": batch["obs"].at[:, 3:].set(0.5)}
    context = {**batch, "obs": batch["obs"].at[:, 1].set(0.5)}
    for keep in (3, 1):
        out = np.asarray(predict(batch, keep))
        assert out.shape == (4, 6 - keep, 256) and np.all(np.isfinite(out))
        np.testing.assert_array_equal(predict(future, keep), out)
        assert not np.allclose(predict(context, keep), out)


def test_sysid_example_quick(tmp_path):
    from examples import pendulum_sysid

    result = pendulum_sysid.main(
        ["--quick", "--models", "rssm", "--out", str(tmp_path), "--no-progress"]
    )
    rows = {(r["model"], r["latents"]): r for r in result["rows"]}
    assert set(rows) == {
        ("rssm", "z"), ("rssm", "h"), ("rssm", "[h, z]"),
        ("mean frame", "-"), ("persistence", "-"), ("frame PCA-8", "pixels"),
    }  # fmt: skip
    q = pendulum_sysid.QUICK
    for name in ("z", "h", "[h, z]"):
        r = rows["rssm", name]
        assert len(r["mse_filtered_per_step"]) == q["length"] - q["context"]
        assert len(r["mse_smoothed_per_step"]) == q["length"] - 1
        for k in ("r2_angle", "r2_velocity", "mse_filtered", "mse_smoothed", "mse_reconstruction",
                  "test_elbo_per_sequence"):  # fmt: skip
            assert np.isfinite(r[k]), (name, k)
    # the features [h, z] contain both regressor sets: in-sample R^2 can only be higher
    for target in ("r2_angle_in_sample", "r2_velocity_in_sample"):
        full = rows["rssm", "[h, z]"][target]
        assert full >= max(rows["rssm", "z"][target], rows["rssm", "h"][target]) - 1e-9
    # the persistence baseline, recomputed from the (cached) held-out set
    test = datasets.pendulum_images(q["test_sequences"], q["length"], seed=1)
    frames = datasets.flatten_images(test["images"]).astype(np.float64)
    c = q["context"]
    expected = np.mean((frames[:, c:] - frames[:, c - 1 : c]) ** 2)
    np.testing.assert_allclose(rows["persistence", "-"]["mse_filtered"], expected, rtol=1e-12)
    for name in ("results.json", "results.md", "rssm_sequences.png", "rssm_latents.png",
                 "rssm_z_space.png", "rssm_h_z_space.png"):  # fmt: skip
        assert (tmp_path / name).stat().st_size > 500, name
    assert "| rssm | z |" in (tmp_path / "results.md").read_text()
    # the saved parameters reproduce the run's R^2 rows (a fresh model's tree, loaded, rescored)
    rescored = {(r["model"], r["latents"]): r for r in pendulum_sysid.rescore(tmp_path)}
    assert set(rescored) == {("rssm", "z"), ("rssm", "h"), ("rssm", "[h, z]")}
    for k, r in rescored.items():
        np.testing.assert_allclose(r["r2_sin_cos_velocity"], rows[k]["r2_sin_cos_velocity"],
                                   rtol=1e-6, atol=1e-9)  # fmt: skip
    assert json.loads((tmp_path / "rescored.json").read_text())["rows"] == json.loads(
        json.dumps(list(rescored.values()))
    )


@pytest.mark.slow
def test_sysid_example_rssm_keeps_the_velocity_in_its_deterministic_path(tmp_path):
    """EKVAE Table 2: an RSSM's stochastic state carries the angle but hardly the velocity,
    which its deterministic path h holds (measured with these settings: R^2 velocity z 0.08,
    h 0.91; angle z 0.97; locally_linear angle 0.94). Both models train and evaluate end to
    end (~75 s of CPU)."""
    from examples import pendulum_sysid

    result = pendulum_sysid.main(
        ["--steps", "300", "--sequences", "200", "--test-sequences", "100", "--out",
         str(tmp_path), "--no-progress"]
    )  # fmt: skip
    rows = {(r["model"], r["latents"]): r for r in result["rows"]}
    z, h = rows["rssm", "z"], rows["rssm", "h"]
    assert z["r2_angle"] > 0.8 and h["r2_velocity"] > 0.5
    assert z["r2_velocity"] < h["r2_velocity"] - 0.3
    assert rows["locally_linear", "z"]["r2_angle"] > 0.5


@pytest.mark.parametrize("model", ["vrkn", "kalmamba"])
def test_sysid_example_quick_vrkn_kalmamba(tmp_path, model):
    """VRKN and KalMamba end to end through the example (tiny sizes) with a memory coordinate
    (``--observed``): every reported number finite. KalMamba's run goes through the open-loop
    forecast with zero-width actions, which crashed the full example after its training."""
    from examples import pendulum_sysid

    result = pendulum_sysid.main(
        ["--quick", "--models", model, "--observed", "2", "--out", str(tmp_path),
         "--no-progress"]
    )  # fmt: skip
    rows = {(r["model"], r["latents"]): r for r in result["rows"]}
    r = rows[model, "z"]
    assert r["latent_dim"] == pendulum_sysid.QUICK["latent"]
    for k in ("r2_angle", "r2_velocity", "mse_filtered", "mse_smoothed", "test_elbo_per_sequence"):
        assert np.isfinite(r[k]), k
    if model == "kalmamba":  # the backbone output and the transition offsets (T - 1 steps)
        for name in ("m", "b"):
            assert np.isfinite(rows[model, name]["r2_velocity"]), name


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, latent, steps",
    [("vrkn", 128, 15000), ("kalmamba", 128, 11600)],
    ids=["vrkn", "kalmamba"],
)
def test_sysid_example_identifies_angle_and_velocity(tmp_path, model, latent, steps):
    """The issue's target, as far as it holds (examples/README.md, 5 seeds each). VRKN (free
    nats 3) reaches held-out R^2 >= 0.95 for the angle and the velocity from the smoothed z:
    latent 128, 15k updates 0.994 / 0.977 over seeds 0-4, lowest velocity 0.967 (17-32 min on
    shared cores). KalMamba (alpha 1, the paper's post-Mamba VRKN dynamics) holds the angle in
    z (0.992, every seed >= 0.989) but its velocity in the transition offsets b_t = dyn(m_t)
    (0.957, seeds 1-4 >= 0.952), not in z (0.787): asserted where it is, at the issue's
    per-seed floor 0.93 (40-47 min)."""
    # run as a user runs it: a fresh process in float32 at XLA's default optimisation level (the
    # suite's float64 and level 0 make this training several times slower)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    cmd = [sys.executable, "-m", "examples.pendulum_sysid", "--models", model,
           "--latent", str(latent), "--steps", str(steps), "--out", str(tmp_path),
           "--no-progress"]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).resolve().parents[1])
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["model"], r["latents"]): r for r in result["rows"]}
    z, velocity = rows[model, "z"], rows[model, "z" if model == "vrkn" else "b"]
    assert z["r2_angle"] >= 0.95, z
    assert velocity["r2_velocity"] >= (0.95 if model == "vrkn" else 0.93), velocity


def test_open_loop_prediction_of_an_lgssm_is_the_kalman_prediction():
    """For a textbook LGSSM with the exact (Kalman smoothing) guide, the start z_{c-1} is a draw
    from the filtered posterior N(m_{c-1|c-1}, P) (numpy Kalman filter as reference) and the
    forecast's predictive mean of o_{c-1+k} given it is H A^k z_{c-1}."""
    import jax.numpy as jnp
    from numpyro.infer import Trace_ELBO

    from examples import pendulum_sysid
    from inference import evaluation, guides
    from pssm.lgssm import lgssm

    A = np.array([[0.95, 0.3], [-0.3, 0.95]])
    Q, H, R = 0.01 * np.eye(2), np.eye(2), 0.05 * np.eye(2)
    model = lgssm(A, Q, H, R)
    entry = pendulum_sysid.ModelEntry(model, guides.kalman_smoothing(model), Trace_ELBO(), None)
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(3, 8, 2)) + np.array([2.0, -1.0])
    c = 4
    start = jax.jit(functools.partial(pendulum_sysid.start_belief, entry, context=c, keep=c))
    start = start({}, jax.random.key(0), {"obs": jnp.asarray(obs)})
    out = evaluation.open_loop_mse(
        jax.jit(pendulum_sysid.predictor(entry, 8 - c)), {}, jax.random.key(1), start, None,
        obs[:, c:], num_samples=400,
    )  # fmt: skip
    z_start = np.asarray(start["z"][-1])  # (B, d): the sampled z_{c-1}
    for b in range(3):
        m, P = np.zeros(2), np.eye(2)
        for t in range(c):
            if t:
                m, P = A @ m, A @ P @ A.T + Q
            K = P @ H.T @ np.linalg.inv(H @ P @ H.T + R)
            m, P = m + K @ (obs[b, t] - H @ m), (np.eye(2) - K @ H) @ P
        assert np.all(np.abs(z_start[b] - m) < 4 * np.sqrt(np.diag(P)))  # sd ~0.2
        z, V = z_start[b], np.zeros((2, 2))
        for k in range(8 - c):
            z, V = A @ z, A @ V @ A.T + Q
            # Monte Carlo sd of the 400-sample mean: sqrt(diag(V) / 400) < 0.02
            np.testing.assert_allclose(out.predictions[b, k], H @ z, atol=0.07)


def test_sysid_time_limit_and_kalmamba_alpha_options():
    """``--max-train-minutes``: a fit callback that stops once the wall time is spent (none
    without a limit); ``--alpha`` reaches KalMamba's objective (the Mahalanobis weight)."""
    import time

    from examples import pendulum_sysid

    assert pendulum_sysid._time_limit(time.perf_counter(), None) is None
    assert not pendulum_sysid._time_limit(time.perf_counter(), 1.0)(None, [])
    assert pendulum_sysid._time_limit(time.perf_counter() - 61.0, 1.0)(None, [])
    parser = argparse.ArgumentParser()
    pendulum_sysid.add_arguments(parser)

    def kalmamba(*argv):
        args = parser.parse_args(["--latent", "4", "--hidden", "8", "--deter", "8", *argv])
        args.action_dim = 0  # set by run() from the data
        return pendulum_sysid.build_kalmamba(args)

    entry = kalmamba("--alpha", "0.25")
    assert entry.elbo.alpha == 0.25 and "alpha 0.25" in entry.note
    assert kalmamba().elbo.alpha == 1.0
    # each family's own ELBO, not the RL presets' KL balancing; VRKN's free nats from the flag
    assert (kalmamba().elbo.elbo.free_nats, kalmamba().elbo.elbo.balance) == (0.0, None)
    args = parser.parse_args(["--latent", "4", "--hidden", "8", "--free-nats", "1.5"])
    args.action_dim = 0
    vrkn = pendulum_sysid.build_vrkn(args).elbo
    assert (vrkn.free_nats, vrkn.balance) == (1.5, None)
