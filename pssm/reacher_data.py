"""Reacher joint-angle sequences (EKVAE, Klushyn et al. 2021, "Latent Matters", Sec. 6, Table 1b),
simulated here with MuJoCo through dm_control's ``reacher`` task (no download), and the same
sequences rendered as RGB images (Table 1c).

The paper's data set: 2000 sequences of 30 time steps of the dm_control ``reacher`` (Tassa et al.
2018), *partially observed*: the angles of the two joints, no velocities; controls ``u_t`` the
two applied torques. Its generating policy, burn-in and angle encoding are not stated; the
choices below are this module's (and its metadata's).

Physics: ``suite.load("reacher", "easy")`` (the ``easy`` and ``hard`` tasks differ only in the
target size, which plays no part here): a planar two-link arm, joint damping 0.01, motors with
gear 0.05 and control range ``[-1, 1]``, MuJoCo's semi-implicit Euler step ``dt = 0.02`` s, one
physics step per control step (the suite's control time step is also 0.02 s). The integrator
gives the exact identity (checked in the tests)

    q_{t+1} = q_t + dt * q'_{t+1}.

The shoulder joint is unlimited (full turns); the wrist (elbow) is limited to +-160 degrees
(``+-2.79`` rad; the soft constraint lets it overshoot by ~0.15 rad).

Sequences. Each sequence starts from the task's ``initialize_episode`` (shoulder angle
``~ U(-pi, pi)``, wrist ``~ U(-160, 160)`` degrees, zero velocities), then runs ``burn_in``
unrecorded steps (default 20, 0.4 s) under the same random torques, so that recorded
sequences start in motion (the joint velocities reach their stationary spread under these
torques within ~10 steps; without a burn-in every sequence would start at rest), then
``length`` recorded steps. Torques: ``u ~ U([-1, 1]^2)`` (the action spec), drawn i.i.d. and
held for ``action_repeat`` control steps (default 1: a new torque every step). ``actions[:, t]``
drives ``t -> t+1`` (the convention of :mod:`pssm.core`; the last action is drawn but unused).

Observations ``(cos phi, sin phi, psi)``, ``phi`` the shoulder angle and ``psi`` the wrist
angle (radians): the shoulder turns freely, so its angle is a point on a circle, given as
``(cos, sin)`` (a wrapped angle would jump by ``2 pi`` and an unwrapped one grows without
bound); the wrist is limited, its angle is given as is. This matches Fig. 3's latent geometry
(a circle for the shoulder times a segment for the wrist, "barrel shape"). The ground truth
``states = (phi wrapped to [-pi, pi), psi, phi', psi')`` is stored for evaluation only.

Images (:func:`reacher_images`, Table 1c: "64 x 64 pixels RGB images"): the same simulation
(same seed, same states and torques as :func:`reacher_angles`), each recorded step rendered
from the task's camera 0 (the top-down ``fixed`` camera of the pixel-based DMC tasks) as
``(size, size, 3)`` ``uint8``, headless (``MUJOCO_GL=egl`` unless already set; about 60
renders per second at 64x64 on a CPU core: ~17 min for the paper's 2000 x 30 frames, once,
then cached).

Results are a pure function of the configuration and seed (one ``numpy`` generator seeded by
``seed`` draws the task's random state and all torques) and are cached like
:func:`pssm.datasets.pendulum_images`: compressed ``.npz`` plus ``.json`` metadata under
:func:`pssm.datasets.default_cache_dir`, keyed by a hash of the configuration and
:data:`VERSION`.
"""

import os

import numpy as np

from .datasets import cached, wrap_angle

VERSION = 1
DT = 0.02  # the reacher's physics and control time step (reacher.xml)


def reacher_observations(shoulder: np.ndarray, wrist: np.ndarray) -> np.ndarray:
    """``(..., 3)``: ``(cos phi, sin phi, psi)`` from the joint angles (module docstring)."""
    shoulder, wrist = np.asarray(shoulder), np.asarray(wrist)
    return np.stack([np.cos(shoulder), np.sin(shoulder), wrist], -1)


def simulate_reacher(
    num_sequences: int,
    length: int,
    seed: int = 0,
    *,
    burn_in: int = 20,
    action_repeat: int = 1,
    render_size: int | None = None,
    camera_id: int = 0,
) -> dict:
    """Run the dm_control reacher under random torques (module docstring), in float64.

    Returns:
        ``{"qpos": (N, T, 2) unwrapped joint angles (shoulder, wrist), "qvel": (N, T, 2),
        "actions": (N, T, 2)}``: the state at each recorded step and the torque applied after
        it; with ``render_size`` also ``"images"`` ``(N, T, size, size, 3)`` ``uint8``, each
        recorded state seen from camera ``camera_id``.
    """
    # headless rendering unless chosen otherwise; set even when not rendering now, since
    # dm_control reads it once, on its first import in the process (as rl.envs does)
    os.environ.setdefault("MUJOCO_GL", "egl")
    from dm_control import suite  # imported here: MuJoCo loads only when data are simulated

    rng = np.random.default_rng(seed)
    env = suite.load("reacher", "easy", task_kwargs={"random": int(rng.integers(2**31))})
    physics = env.physics
    if physics.timestep() != DT or env.control_timestep() != DT:
        raise RuntimeError(f"unexpected reacher time steps {physics.timestep()}, "
                           f"{env.control_timestep()} (expected {DT})")  # fmt: skip
    spec = env.action_spec()
    N, T, steps = num_sequences, length, burn_in + length
    n_draws = -(-steps // action_repeat)
    qpos, qvel = np.empty((N, T, 2)), np.empty((N, T, 2))
    actions = np.empty((N, T, 2))
    images = (
        None if render_size is None else np.empty((N, T, render_size, render_size, 3), np.uint8)
    )
    for n in range(N):
        env.reset()  # task.initialize_episode: random joint angles, zero velocities
        draws = rng.uniform(spec.minimum, spec.maximum, (n_draws, 2))
        torques = np.repeat(draws, action_repeat, axis=0)[:steps]
        for k in range(steps):
            t = k - burn_in
            if t >= 0:
                qpos[n, t], qvel[n, t] = physics.data.qpos, physics.data.qvel
                actions[n, t] = torques[k]
                if images is not None:
                    images[n, t] = physics.render(render_size, render_size, camera_id=camera_id)
            physics.set_control(torques[k])  # what the task's before_step does
            physics.step()
    out = {"qpos": qpos, "qvel": qvel, "actions": actions}
    return out if images is None else {**out, "images": images}


def _config(num_sequences, length, seed, burn_in, action_repeat, size=None) -> dict:
    return {
        "name": "reacher_angles" if size is None else "reacher_images",
        "version": VERSION,
        "num_sequences": int(num_sequences),
        "length": int(length),
        "seed": int(seed),
        "burn_in": int(burn_in),
        "action_repeat": int(action_repeat),
        **({} if size is None else {"size": int(size), "camera_id": 0}),
    }


def _generate(config: dict) -> dict:
    sim = simulate_reacher(
        config["num_sequences"], config["length"], config["seed"],
        burn_in=config["burn_in"], action_repeat=config["action_repeat"],
        render_size=config.get("size"), camera_id=config.get("camera_id", 0),
    )  # fmt: skip
    shoulder, wrist = sim["qpos"][..., 0], sim["qpos"][..., 1]
    images = {} if "images" not in sim else {"images": sim["images"]}
    return {
        **images,
        "obs": reacher_observations(shoulder, wrist).astype(np.float32),
        "actions": sim["actions"].astype(np.float32),
        "states": np.concatenate(
            [np.stack([wrap_angle(shoulder), wrist], -1), sim["qvel"]], -1
        ),  # float64: exact enough to replay the physics from
    }


def _metadata(config: dict, key: str) -> dict:
    return {
        "config": config,
        "key": key,
        "physics": (
            "dm_control suite reacher (easy), MuJoCo semi-implicit Euler dt=0.02 s, one physics "
            "step per control step; initial state from the task's initialize_episode, then "
            f"{config['burn_in']} unrecorded steps"
        ),
        "controls": (
            f"u_t ~ U([-1, 1]^2) i.i.d., each held for {config['action_repeat']} step(s); "
            "actions[:, t] drives t -> t+1"
        ),
        "obs": "(cos phi, sin phi, psi): phi shoulder angle, psi wrist angle (rad)",
        **(
            {}
            if "size" not in config
            else {"images": f"(size, size, 3) uint8 RGB from camera {config['camera_id']}"}
        ),
        "states": "(phi wrapped to [-pi, pi), psi, phi', psi') at each step, for evaluation",
    }


def reacher_angles(
    num_sequences: int = 2000,
    length: int = 30,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    *,
    burn_in: int = 20,
    action_repeat: int = 1,
    cache: bool = True,
) -> dict:
    """The reacher joint-angle set (module docstring).

    Args:
        num_sequences, length: ``N`` sequences of ``T`` steps (EKVAE: 2000 of 30).
        seed: the only source of randomness; use another seed for a held-out set.
        cache_dir: where to cache (default :func:`pssm.datasets.default_cache_dir`).
        burn_in: unrecorded steps under random torques before each sequence.
        action_repeat: control steps each random torque is held for.
        cache: read and write the cache (``False``: always simulate, write nothing).

    Returns:
        ``{"obs": (N, T, 3) float32 (cos phi, sin phi, psi), "actions": (N, T, 2) float32,
        "states": (N, T, 4) float64 (phi wrapped, psi, phi', psi'), "metadata": dict}``;
        ``metadata["cache_path"]`` names the ``.npz`` (or is ``None`` without cache).
    """
    return _dataset(num_sequences, length, seed, burn_in, action_repeat, None, cache, cache_dir)


def reacher_images(
    num_sequences: int = 2000,
    length: int = 30,
    seed: int = 0,
    size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    *,
    burn_in: int = 20,
    action_repeat: int = 1,
    cache: bool = True,
) -> dict:
    """The reacher image set (EKVAE Table 1c; module docstring): :func:`reacher_angles`'
    sequences, rendered.

    Args:
        size: image side in pixels (the paper: 64).
        others: as :func:`reacher_angles` (the same seed gives the same states and torques).

    Returns:
        ``{"images": (N, T, size, size, 3) uint8, "obs": (N, T, 3) float32 (the joint-angle
        observations, for reference), "actions", "states", "metadata"}`` as
        :func:`reacher_angles`.
    """
    return _dataset(num_sequences, length, seed, burn_in, action_repeat, size, cache, cache_dir)


def _dataset(num_sequences, length, seed, burn_in, action_repeat, size, cache, cache_dir):
    """Checked arguments -> the cached set (images when ``size`` is not ``None``)."""
    if min(num_sequences, length, action_repeat, 1 if size is None else size) < 1 or burn_in < 0:
        raise ValueError(
            "need num_sequences, length, action_repeat and size >= 1, burn_in >= 0; got "
            f"{num_sequences}, {length}, {action_repeat}, {size}, {burn_in}"
        )
    config = _config(num_sequences, length, seed, burn_in, action_repeat, size)
    return cached("reacher", config, _generate, _metadata, cache=cache, cache_dir=cache_dir)
