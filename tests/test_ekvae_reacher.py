"""The reacher joint-angle data (pssm.reacher_data), the EKVAE smoothed-start prediction
(examples.ekvae_common) and the EKVAE reproductions in reduced form (examples.ekvae_reacher,
examples.ekvae_pendulum)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from examples import ekvae_common, ekvae_pendulum, ekvae_reacher
from examples.ekvae_common import rollout, smoothed_start_prediction
from inference import training
from inference.guides import ekvae_guide
from inference.objectives import EKVAEBound
from inference.training import checkpoint
from pssm.datasets import wrap_angle
from pssm.ekvae import NeuralLinearisation, ekvae
from pssm.reacher_data import DT, reacher_angles, reacher_images, reacher_observations
from tests.kalman_reference import DenseModel, condition

# ---- data --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return reacher_angles(12, 15, seed=3, cache_dir=tmp_path_factory.mktemp("cache"))


def test_shapes_ranges_and_observations(small):
    obs, actions, states = small["obs"], small["actions"], small["states"]
    assert obs.shape == (12, 15, 3) and obs.dtype == np.float32
    assert actions.shape == (12, 15, 2) and actions.dtype == np.float32
    assert states.shape == (12, 15, 4)
    assert np.all(np.abs(actions) <= 1.0) and actions.std() > 0.5  # U(-1, 1): sd 0.577
    phi, psi = states[..., 0], states[..., 1]
    assert np.all((phi >= -np.pi) & (phi < np.pi))
    assert np.all(np.abs(psi) < np.deg2rad(160) + 0.2)  # limited joint, soft constraint
    np.testing.assert_allclose(obs[..., 0], np.cos(phi), atol=1e-6)
    np.testing.assert_allclose(obs[..., 1], np.sin(phi), atol=1e-6)
    np.testing.assert_allclose(obs[..., 2], psi, atol=1e-6)
    # burn-in: sequences start in motion (from rest the velocities would all be 0)
    assert np.all(np.abs(states[:, 0, 2:]).mean(0) > 0.3)


def test_velocities_are_the_finite_differences_of_the_angles(small):
    """MuJoCo's semi-implicit Euler: q_{t+1} = q_t + dt q'_{t+1}, exactly."""
    s = small["states"]
    dphi = wrap_angle(s[:, 1:, 0] - s[:, :-1, 0]) / DT
    dpsi = (s[:, 1:, 1] - s[:, :-1, 1]) / DT
    np.testing.assert_allclose(dphi, s[:, 1:, 2], atol=1e-8)
    np.testing.assert_allclose(dpsi, s[:, 1:, 3], atol=1e-8)
    assert np.abs(dphi - s[:, :-1, 2]).max() > 0.1  # not the velocity of the step before


def test_replay_through_the_suite_environment(small):
    """From a recorded state, the suite's env.step under actions[:, t] gives state t+1."""
    from dm_control import suite

    env = suite.load("reacher", "easy", task_kwargs={"random": 0})
    env.reset()
    physics = env.physics
    s, actions = small["states"], small["actions"]
    for n in (0, 5):
        with physics.reset_context():
            physics.data.qpos[:] = s[n, 0, :2]
            physics.data.qvel[:] = s[n, 0, 2:]
        for t in range(14):
            env.step(actions[n, t])
            q, v = physics.data.qpos, physics.data.qvel
            got = np.array([wrap_angle(q[0]), q[1], v[0], v[1]])
            np.testing.assert_allclose(got, s[n, t + 1], atol=1e-4)  # float32 actions stored


def test_determinism_and_cache_round_trip(small, tmp_path):
    fresh = reacher_angles(12, 15, seed=3, cache=False)
    assert fresh["metadata"]["cache_path"] is None
    for k in ("obs", "actions", "states"):
        np.testing.assert_array_equal(fresh[k], small[k])
    path = small["metadata"]["cache_path"]
    again = reacher_angles(12, 15, seed=3, cache_dir=tmp_path.parent / "unused")
    assert again["metadata"]["key"] == small["metadata"]["key"]
    meta = json.loads(open(path.replace(".npz", ".json")).read())
    assert meta["config"]["seed"] == 3 and meta["config"]["length"] == 15
    # the cached file is read back, not regenerated: change it and see the change
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["obs"] = arrays["obs"] + 1.0
    np.savez_compressed(path, **arrays)
    directory = str(path).rsplit("/", 1)[0]
    cached = reacher_angles(12, 15, seed=3, cache_dir=directory)
    np.testing.assert_array_equal(cached["obs"], small["obs"] + 1.0)
    other = reacher_angles(12, 15, seed=4, cache=False)
    assert not np.allclose(other["states"], small["states"])
    with pytest.raises(ValueError):
        reacher_angles(0, 15)


def test_r2_targets_order():
    """The true state's own coordinates as latents explain every target exactly."""
    rng = np.random.default_rng(0)
    states = np.stack([rng.uniform(-np.pi, np.pi, (20, 6)), rng.uniform(-2, 2, (20, 6)),
                       rng.normal(size=(20, 6)), rng.normal(size=(20, 6))], -1)  # fmt: skip
    exact = np.concatenate([reacher_observations(states[..., 0], states[..., 1]),
                            states[..., 2:]], -1)  # fmt: skip
    r2 = ekvae_reacher.r2_targets(exact, states)
    assert all(abs(v - 1.0) < 1e-9 for v in r2.values()), r2
    r2 = ekvae_reacher.r2_targets(exact[..., :3], states)  # angles only: no velocity
    assert r2["phi"] > 0.999 and r2["psi"] > 0.999 and r2["phi'"] < 0.1 and r2["psi'"] < 0.1


# ---- smoothed-start prediction against an independent reference --------------------------------


class LinearEncoder(nnx.Module):
    def __init__(self, p, k, *, rngs):
        self.lin = nnx.Linear(p, k, rngs=rngs)

    def __call__(self, o):
        return self.lin(o), jnp.full(o.shape[:-1] + (self.lin.out_features,), 0.1)


def _linear_ekvae():
    """One base matrix (so the dynamics are linear: F, B, Q whatever g says), linear encoder and
    decoder."""
    d, p_a, p, u = 5, 3, 3, 2
    rng = np.random.default_rng(1)
    F = np.eye(d) + 0.1 * rng.normal(size=(d, d))
    B = 0.3 * rng.normal(size=(d, u))
    A = 0.1 * rng.normal(size=(d, d))
    Q = A @ A.T + 0.05 * np.eye(d)
    transition = NeuralLinearisation(d, u, 1, (4,), F_init=F, B_init=B, Q_init=Q,
                                     rngs=nnx.Rngs(0))  # fmt: skip
    decoder = nnx.Linear(p_a, p, rngs=nnx.Rngs(2))
    model = ekvae(p, p_a, d, action_dim=u, transition=transition, decoder=decoder,
                  likelihood="gaussian", seed=3)  # fmt: skip
    encoder = LinearEncoder(p, p_a, rngs=nnx.Rngs(4))
    guide = ekvae_guide(model, encoder=encoder)
    return model, guide, encoder, decoder, (F, B, Q)


def test_smoothed_start_prediction_matches_a_dense_reference():
    model, guide, encoder, decoder, (F, B, Q) = _linear_ekvae()
    rng = np.random.default_rng(5)
    Bn, T, context = 3, 9, 4
    obs = jnp.asarray(rng.normal(size=(Bn, T, 3)))
    actions = jnp.asarray(rng.uniform(-1, 1, (Bn, T, 2)))
    objective = training.elbo_objective(model, guide, EKVAEBound())
    batch = {"obs": obs, "actions": actions}
    init = jax.jit(lambda k: training.init_train_state(objective, optax.adam(1e-3), k, batch))
    state = init(jax.random.key(0))
    params = objective.constrain(state.params)
    out = smoothed_start_prediction(model, guide, params, jax.random.key(1), obs, actions,
                                    context=context, sample=False)  # fmt: skip
    We, be = np.asarray(encoder.lin.kernel[...]), np.asarray(encoder.lin.bias[...])
    Wd, bd = np.asarray(decoder.kernel[...]), np.asarray(decoder.bias[...])
    H, R = np.eye(3, 5), 0.1 * np.eye(3)  # the model's defaults (untrained)
    x, u = np.asarray(obs), np.asarray(actions)
    expected = np.empty((Bn, T, 3))
    for n in range(Bn):
        a = x[n, :context] @ We + be
        dense = DenseModel(np.zeros(5), np.eye(5), np.repeat(F[None], context - 1, 0),
                           u[n, : context - 1] @ B.T, np.repeat(Q[None], context - 1, 0),
                           [(a[t], H, R) for t in range(context)])  # fmt: skip
        z = condition(dense, range(context))[0][:5]  # smoothed mean of z_0
        for t in range(T):
            expected[n, t] = (H @ z) @ Wd + bd
            z = F @ z + B @ u[n, t]
    np.testing.assert_allclose(out.predictions, expected, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(out.mse, np.mean((expected - x) ** 2), rtol=1e-6)
    np.testing.assert_allclose(out.per_step, ((expected - x) ** 2).mean((0, 2)), rtol=1e-6)
    # both modes from one smoothing of the context, each as its own call gives it
    drawn = smoothed_start_prediction(model, guide, params, jax.random.key(1), obs, actions,
                                      context=context)  # fmt: skip
    both, row = ekvae_common.predictions(model, guide, params, jax.random.key(1), obs, actions,
                                         context=context)  # fmt: skip
    np.testing.assert_allclose(both.predictions, drawn.predictions, rtol=1e-6)
    np.testing.assert_allclose(row["prediction_mse"], drawn.mse, rtol=1e-6)
    np.testing.assert_allclose(row["prediction_mse_mean_path"], out.mse, rtol=1e-6)
    # sampled: z_1 | z_0 ~ N(F z_0 + B u_0, Q)
    z0 = jnp.broadcast_to(jnp.asarray(rng.normal(size=5)), (4000, 5))
    u0 = jnp.broadcast_to(actions[0], (4000, T, 2))
    z = np.asarray(rollout(model, params, jax.random.key(2), z0, u0, 2))[:, 1]
    mean = F @ np.asarray(z0[0]) + B @ np.asarray(actions[0, 0])
    np.testing.assert_allclose(z.mean(0), mean, atol=4 * np.sqrt(Q.diagonal().max() / 4000))
    np.testing.assert_allclose(np.cov(z.T), Q, atol=0.01)


def test_images_render_the_same_sequences(tmp_path):
    """The image set is the angle set's simulation, rendered: same states and torques for the
    same seed; frames change as the arm moves, differ between sequences, and are cached."""
    angles = reacher_angles(3, 4, seed=5, cache=False)
    images = reacher_images(3, 4, seed=5, size=48, cache_dir=tmp_path)
    frames = images["images"]
    assert frames.shape == (3, 4, 48, 48, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(images["states"], angles["states"])
    np.testing.assert_array_equal(images["actions"], angles["actions"])
    np.testing.assert_array_equal(images["obs"], angles["obs"])
    assert frames.std() > 10  # an arm, a target and a floor, not a blank frame
    diff = lambda a, b: np.abs(a.astype(int) - b.astype(int)).mean()
    moved = np.abs(angles["states"][0, 3, :2] - angles["states"][0, 0, :2]).max()
    assert moved > 0.01 and diff(frames[0, 0], frames[0, 3]) > 0
    assert diff(frames[0, 0], frames[1, 0]) > diff(frames[0, 0], frames[0, 1])
    again = reacher_images(3, 4, seed=5, size=48, cache_dir=tmp_path)
    assert again["metadata"]["cache_path"] == images["metadata"]["cache_path"] is not None
    np.testing.assert_array_equal(again["images"], frames)
    with pytest.raises(ValueError):
        reacher_images(3, 4, size=0)


# ---- the example -------------------------------------------------------------------------------


def test_quick_run_writes_finite_results(tmp_path):
    rows = ekvae_reacher.main(["--quick", "--variants", "annealing", "--out", str(tmp_path)])
    (row,) = rows
    numbers = [row[f"r2_{t}"] for t in ekvae_reacher.TARGETS]
    numbers += [row["prediction_mse"], row["prediction_mse_after_context"],
                row["prediction_mse_mean_path"], row["test_elbo_per_sequence"],
                row["lambda_or_beta"]]  # fmt: skip
    numbers += row["prediction_mse_per_step"]
    assert np.all(np.isfinite(numbers))
    assert len(row["prediction_mse_per_step"]) == ekvae_reacher.CONFIGS["quick"]["length"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"][0]["prediction_mse"] == row["prediction_mse"]
    assert "EKVAE (annealing)" in (tmp_path / "results.md").read_text()
    for name in ("latent_space.png", "filtered_0.png", "prediction_0.png", "history.json",
                 "params.npz"):  # fmt: skip
        assert (tmp_path / "annealing" / name).stat().st_size > 1000


def test_images_quick_run_writes_finite_results(tmp_path):
    """Table 1c's pipeline in miniature: rendered frames, conv encoder/decoder, CO + VHP."""
    argv = ["--images", "--quick", "--variants", "co-vhp", "--out", str(tmp_path)]
    (row,) = ekvae_reacher.main(argv)
    numbers = [row[f"r2_{t}"] for t in ekvae_reacher.TARGETS]
    numbers += [row["test_elbo_per_sequence"], *row["prediction_mse_per_step"]]
    assert np.all(np.isfinite(numbers))
    assert len(row["prediction_mse_per_step"]) == ekvae_reacher.IMAGE_CONFIGS["quick"]["length"]
    assert 0 < row["prediction_mse"] < 1  # pixel intensities in [0, 1]
    assert row["paper"] == ekvae_reacher.PAPER_IMAGES["co-vhp"]
    assert "48x48 RGB images" in (tmp_path / "results.md").read_text()
    for name in ("latent_space.png", "filtered_0.png", "prediction_0.png"):
        assert (tmp_path / "co-vhp" / name).stat().st_size > 1000, name


def test_set_rejects_unknown_entries(capsys):
    """A mistyped ``--set`` entry stops the run instead of being ignored."""
    with pytest.raises(SystemExit):
        ekvae_pendulum.main(["--quick", "--set", "z_dimm=4"])
    assert "--set z_dimm: unknown entry" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ekvae_reacher.main(["--quick", "--set", "sleck=0.1"])


def test_pendulum_likelihood_is_a_configuration_entry():
    """``--set likelihood=gaussian --set obs_var=v`` scores pixels by N(decoder, v)."""
    import numpyro.distributions as dist
    from numpyro import handlers

    obs = jnp.full((2, 3, 256), 0.5)
    for likelihood, kind in (("bernoulli", "IntensityBernoulli"), ("gaussian", "Normal")):
        cfg = {**ekvae_pendulum.CONFIGS["quick"], "likelihood": likelihood, "obs_var": 0.04}
        model, _ = ekvae_pendulum.build(cfg, False, 0)
        site = handlers.trace(handlers.seed(model, 0)).get_trace(obs)["obs"]["fn"]
        while isinstance(site, dist.Independent | dist.MaskedDistribution):
            site = site.base_dist
        assert type(site).__name__ == kind
        if likelihood == "gaussian":
            np.testing.assert_allclose(site.scale, 0.2)


def test_pendulum_quick_run_writes_finite_results(tmp_path):
    """Also: ``controls=true`` (random torques as actions: the model takes ``u``) and
    ``restarts=2`` (candidates screened on a validation set, the selected one reported)."""
    sets = ["z_dim=4", "controls=true", "initial_velocity=2.0", "restarts=2"]
    argv = ["--quick", "--variants", "co", "--out", str(tmp_path)]
    argv += [arg for entry in sets for arg in ("--set", entry)]
    (row,) = ekvae_pendulum.main(argv)
    assert row["z_dim"] == 4  # (a_1, a_2, two dynamic coordinates)
    assert [c["seed"] for c in row["screening"]] == [0, 1000]
    assert sum(c["selected"] for c in row["screening"]) == 1
    saved = json.loads((tmp_path / "results.json").read_text())["config"]
    assert saved["controls"] is True and saved["initial_velocity"] == 2.0
    assert ekvae_pendulum.build(saved, False, 0)[0].action_dim == 1
    numbers = [row["r2_angle"], row["r2_velocity"], row["prediction_mse"],
               row["prediction_mse_mean_path"], row["test_elbo_per_sequence"],
               *row["prediction_mse_per_step"]]  # fmt: skip
    assert np.all(np.isfinite(numbers)) and len(row["prediction_mse_per_step"]) == 15
    assert 0 < row["prediction_mse"] < 1  # pixel intensities in [0, 1]
    assert row["prediction_mse_mean_path"] != row["prediction_mse"]  # no noise drawn on it
    saved_params = np.load(tmp_path / "co" / "params.npz")
    assert any("transition" in k for k in saved_params.files)
    assert all(np.all(np.isfinite(saved_params[k])) for k in saved_params.files)
    assert "EKVAE (CO)" in (tmp_path / "results.md").read_text()
    for name in ("latent_space_angle.png", "latent_space_velocity.png", "filtered_0.png",
                 "prediction_0.png", "history.json"):  # fmt: skip
        assert (tmp_path / "co" / name).stat().st_size > 1000, name


@pytest.mark.slow
def test_co_identifies_the_reacher(tmp_path):
    """A reduced real run: EKVAE (CO), 1000 training sequences, 1500 updates (~75 s on one
    core). Measured (seed 0): R^2 0.977 / 0.997 / 0.777 / 0.588, prediction MSE 0.172 from the
    command line (float32); 0.985 / 0.999 / 0.772 / 0.560, MSE 0.0137 under pytest (float64,
    conftest); predicting the held-out mean scores 1.2."""
    argv = ["--variants", "co", "--steps", "1500", "--set", "train=1000", "--out", str(tmp_path)]
    (row,) = ekvae_reacher.main(argv)
    assert row["r2_phi"] > 0.95 and row["r2_psi"] > 0.95, row
    assert row["r2_phi'"] > 0.5, row
    assert row["prediction_mse"] < 0.3, row


# ---- restarts chosen by a validation bound ------------------------------------------------------


def _tiny_pendulum(seed, cfg):
    model, guide = ekvae_pendulum.build(cfg, False, seed)
    return ekvae_common.objective_for("co", cfg, model, guide), model, guide


@pytest.fixture(scope="module")
def tiny_data():
    rng = np.random.default_rng(0)
    frames = lambda n: {"obs": jnp.asarray(rng.uniform(0, 1, (n, 4, 256)), jnp.float32)}
    return frames(8), frames(4)


def test_train_resumed_equals_one_run(tiny_data):
    """``train(..., num_steps=k)`` then ``resume`` to ``n`` gives the state of ``n`` updates in
    one call, and one history record per update."""
    data, _ = tiny_data
    cfg = {**ekvae_pendulum.CONFIGS["quick"], "steps": 6, "batch": 4, "calibration": 2}
    objective, *_ = _tiny_pendulum(0, cfg)
    whole = ekvae_common.train(objective, data, cfg, 0)
    optimizer = optax.adam(cfg["lr"])
    half = ekvae_common.train(objective, data, cfg, 0, num_steps=3, optimizer=optimizer)
    resumed = ekvae_common.train(objective, data, cfg, 0, optimizer=optimizer, resume=half)
    assert [h["step"] for h in resumed[1]] == [h["step"] for h in whole[1]] == list(range(1, 7))
    jax.tree.map(np.testing.assert_array_equal, resumed[0].params, whole[0].params)


def test_train_selected_continues_the_best_validation_bound(tiny_data):
    """Each candidate trains ``screen_steps`` updates; the one with the highest held-out bound
    on the validation batch (recomputed here) is continued to ``steps``."""
    from inference.evaluation import heldout_elbo
    from inference.training.loop import _compiled_steps

    data, validation = tiny_data
    cfg = {**ekvae_pendulum.CONFIGS["quick"], "steps": 5, "batch": 4, "calibration": 2,
           "restarts": 3, "screen_steps": 2}  # fmt: skip
    make = lambda s: _tiny_pendulum(s, cfg)
    misses = _compiled_steps.cache_info().misses
    objective, model, guide, state, history, seconds, screening = ekvae_common.train_selected(
        make, data, validation, cfg, 7
    )
    # one compiled loop for the three screenings (2 updates), one for the continuation (5)
    assert _compiled_steps.cache_info().misses - misses == 2
    assert [c["seed"] for c in screening] == [7, 1007, 2007]
    bounds = [c["validation_bound"] for c in screening]
    assert len(set(bounds)) == 3  # different initialisations
    best = int(np.argmax(bounds))
    assert [c["selected"] for c in screening] == [k == best for k in range(3)]
    assert int(state.step) == 5 and [h["step"] for h in history] == [1, 2, 3, 4, 5]
    assert seconds > 0
    # the continued run is the selected candidate's: its first two updates reproduce
    objective_b, *_ = make(screening[best]["seed"])
    first = ekvae_common.train(objective_b, data, cfg, screening[best]["seed"], num_steps=2)
    b = heldout_elbo(objective_b, first[0].params, first[0].aux, jax.random.key(7 + 5),
                     validation, num_particles=4)["elbo_per_sequence"]  # fmt: skip
    np.testing.assert_allclose(b, bounds[best], rtol=1e-6)
    np.testing.assert_allclose(history[1]["loss"], first[1][1]["loss"], rtol=1e-6)
    with pytest.raises(ValueError, match="screen_steps"):
        ekvae_common.train_selected(make, data, validation, {**cfg, "screen_steps": 9}, 0)
    with pytest.raises(ValueError, match="restarts"):
        ekvae_common.train_selected(make, data, validation, {**cfg, "restarts": 0}, 0)
    other = lambda s: _tiny_pendulum(s, {**cfg, "hidden": cfg["hidden"] + (s > 7)})
    with pytest.raises(ValueError, match="names or shapes"):  # raised before any training
        ekvae_common.train_selected(other, data, validation, cfg, 7)


def test_saved_parameters_load_into_a_fresh_configuration(tmp_path):
    """``save_params`` / ``load_params`` round trip: the trained values come back in the tree
    of a freshly built model of the same configuration; another configuration is refused."""
    cfg = ekvae_pendulum.CONFIGS["quick"]
    data = {"obs": jnp.zeros((2, 3, 256))}

    def constrained(cfg, seed):
        objective, *_ = _tiny_pendulum(seed, cfg)
        init = lambda k: training.init_train_state(objective, optax.adam(1e-3), k, data)
        return objective.constrain(jax.jit(init)(jax.random.key(0)).params)

    trained = constrained(cfg, 3)
    path = checkpoint.save_params(tmp_path / "params.npz", trained)
    loaded = checkpoint.load_params(path, constrained(cfg, 4))
    jax.tree.map(np.testing.assert_array_equal, loaded, trained)
    with pytest.raises(ValueError, match="shape"):
        checkpoint.load_params(path, constrained({**cfg, "hidden": 8}, 4))


@pytest.mark.slow
def test_co_identifies_the_pendulum_velocity(tmp_path):
    """The pendulum reproduction at its full configuration (random torques, 30000 updates, best
    of 3 starts by a validation bound), VHP-EKVAE under CO and under annealing, seed 0: ~15 min
    on one core. Measured: CO 0.956 / 0.993, annealing 0.890 / 0.861 (R^2 angle / velocity).
    CO must identify both (>= 0.95, the issue's target; paper 0.992 / 0.998) and beat
    annealing on both. (Seed 0 of four: the example's docstring has the others, where the
    VHP-EKVAE (CO) velocity reaches 0.935-0.993 and its mean over seeds both targets.)"""
    # as a user runs it: a fresh process in float32 at XLA's default optimisation level
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    cmd = [sys.executable, "-m", "examples.ekvae_pendulum", "--variants", "co-vhp,annealing-vhp",
           "--out", str(tmp_path)]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).resolve().parents[1])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    co, annealing = ({r["variant"]: r for r in rows}[k] for k in ("co-vhp", "annealing-vhp"))
    assert co["r2_velocity"] >= 0.95 and co["r2_angle"] >= 0.95, co
    assert co["r2_velocity"] > annealing["r2_velocity"], (co, annealing)
    assert co["r2_angle"] > annealing["r2_angle"], (co, annealing)
