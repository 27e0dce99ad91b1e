"""Data sets: the 16x16 pendulum image sequences of DVBF / EKVAE, simulated and rendered here.

The pendulum set of Karl et al. (2017, "Deep Variational Bayes Filters", ICLR) as used by
Klushyn et al. (2021, "Latent Matters: Learning Deep State-Space Models", NeurIPS, Sec. 6):
500 sequences of 15 grayscale images of 16x16 pixels, a swinging pendulum whose angle and
angular velocity are the ground truth a learned latent space is regressed onto (R^2 of an OLS
regression, :func:`inference.evaluation.r2_ols`). The original files are not public; this
module regenerates an equivalent set deterministically from a seed (no download).

Physics (OpenAI gym ``Pendulum``: ``g = 10``, ``m = l = 1``, frame interval ``dt = 0.05``).
The angle ``theta`` is measured from the *upright* position, counter-clockwise positive:

    theta'' = -3 g / (2 l) sin(theta + pi) + 3 / (m l^2) u  =  (3 g / (2 l)) sin(theta) + 3 u

(a uniform rod about its end). Without torque the energy per unit inertia

    E = theta'^2 / 2 + (3 g / (2 l)) cos(theta)

is conserved. Each frame interval is integrated with ``substeps`` classical Runge-Kutta (RK4)
steps (default 20, step 2.5 ms: local error ~1e-12, far below anything a model resolves).
Unlike gym the velocity is not clipped (without torque ``|theta'| < 7.9 < 8`` anyway, gym's
limit). Initial states as gym's ``reset``: ``theta_0 ~ U(-pi, pi)``, ``theta'_0 ~ U(-v, v)`` with
``v = initial_velocity`` (gym: 1). Over 15 frames (0.75 s, under half a small-swing period
1.6 s) most sequences fall from near rest, so the angle alone explains part of the velocity:
with ``v = 1`` the best function of the angle reaches R^2 ~0.16 for the velocity, with ``v = 8``
~0 (measured on 4000 sequences).
With ``controls=True`` a torque ``u_t ~ U(-max_torque, max_torque)`` (gym: 2) is drawn per frame
and held over the interval after frame ``t`` (zero-order hold): ``actions[:, t]`` drives
``o_t -> o_{t+1}`` (the convention of :mod:`pssm.core`; the last action is unused).

Rendering (numpy only): the pivot is the image centre, the rod a capsule (a segment with round
ends) of length ``0.4 * size`` and width ``0.12 * size`` pixels from the pivot towards
``(x, y_up) = (-sin theta, cos theta)`` (upright at ``theta = 0``, image rows run downwards).
Each pixel is the fraction of its ``supersample x supersample`` sub-pixel centres inside the
capsule (box-filter anti-aliasing), so intensities lie in ``[0, 1]``: 1 on the rod, 0 off it.

Returned states are ``(theta wrapped to [-pi, pi), theta')``. Results are a pure function of
the configuration and seed and are cached as compressed ``.npz`` plus ``.json`` metadata under
``$XDG_CACHE_HOME/pssm/datasets`` (default ``~/.cache/pssm/datasets``), keyed by a hash of the
configuration and :data:`VERSION`.
"""

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

VERSION = 1
GRAVITY, MASS, LENGTH = 10.0, 1.0, 1.0
ROD_LENGTH, ROD_WIDTH = 0.4, 0.12  # fractions of the image size


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pssm/datasets``, default ``~/.cache/pssm/datasets``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "pssm" / "datasets"


def pendulum_acceleration(theta: np.ndarray, torque: np.ndarray | float = 0.0) -> np.ndarray:
    """``theta'' = (3 g / (2 l)) sin(theta) + 3 / (m l^2) u`` (gym's pendulum, upright at 0)."""
    return 1.5 * GRAVITY / LENGTH * np.sin(theta) + 3.0 / (MASS * LENGTH**2) * torque


def pendulum_energy(theta: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """``E = theta'^2 / 2 + (3 g / (2 l)) cos(theta)``, conserved without torque."""
    return 0.5 * omega**2 + 1.5 * GRAVITY / LENGTH * np.cos(theta)


def simulate_pendulum(
    theta0: np.ndarray,
    omega0: np.ndarray,
    torques: np.ndarray,
    *,
    dt: float = 0.05,
    substeps: int = 20,
) -> np.ndarray:
    """Integrate the pendulum with RK4 over frames, in float64.

    Args:
        theta0, omega0: initial angle and angular velocity, ``(N,)``.
        torques: ``(N, T)`` torque held over the interval after each frame (the last unused).
        dt: time between frames.
        substeps: RK4 steps per frame interval.

    Returns:
        Unwrapped states ``(N, T, 2)``: ``(theta_t, theta'_t)`` at the frames ``t = 0..T-1``.
    """
    theta = np.asarray(theta0, np.float64).copy()
    omega = np.asarray(omega0, np.float64).copy()
    torques = np.asarray(torques, np.float64)
    if theta.ndim != 1 or omega.shape != theta.shape or torques.shape[:1] != theta.shape:
        raise ValueError(
            f"theta0 {theta.shape}, omega0 {omega.shape} and torques {torques.shape} must be "
            "(N,), (N,) and (N, T)"
        )
    if substeps < 1 or not dt > 0:
        raise ValueError(f"need substeps >= 1 and dt > 0, got {substeps}, {dt}")
    h = dt / substeps

    def deriv(th, om, u):
        return om, pendulum_acceleration(th, u)

    states = [np.stack([theta, omega], -1)]
    for t in range(torques.shape[1] - 1):
        u = torques[:, t]
        for _ in range(substeps):
            k1 = deriv(theta, omega, u)
            k2 = deriv(theta + h / 2 * k1[0], omega + h / 2 * k1[1], u)
            k3 = deriv(theta + h / 2 * k2[0], omega + h / 2 * k2[1], u)
            k4 = deriv(theta + h * k3[0], omega + h * k3[1], u)
            theta = theta + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
            omega = omega + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        states.append(np.stack([theta, omega], -1))
    return np.stack(states, axis=1)


def wrap_angle(theta: np.ndarray) -> np.ndarray:
    """``theta`` wrapped to ``[-pi, pi)``."""
    return (np.asarray(theta) + np.pi) % (2 * np.pi) - np.pi


def render_pendulum(theta: np.ndarray, size: int = 16, supersample: int = 8) -> np.ndarray:
    """Anti-aliased grayscale frames ``(..., size, size)`` float32 in ``[0, 1]`` of angles
    ``theta`` (any shape); geometry in the module docstring."""
    theta = np.asarray(theta, np.float64)
    if size < 4 or supersample < 1:
        raise ValueError(f"need size >= 4 and supersample >= 1, got {size}, {supersample}")
    flat = theta.reshape(-1)
    n = size * supersample
    # sub-pixel centres in pixel units, origin at the pivot (image centre), y pointing up
    coords = (np.arange(n) + 0.5) / supersample - size / 2
    x, y = np.meshgrid(coords, -coords)  # rows run downwards in the image
    points = np.stack([x.ravel(), y.ravel()], -1)  # (n*n, 2)
    length, half_width = ROD_LENGTH * size, ROD_WIDTH * size / 2
    frames = np.empty((flat.size, size, size), np.float32)
    chunk = max(1, 2**22 // points.shape[0])
    for start in range(0, flat.size, chunk):
        th = flat[start : start + chunk]
        direction = np.stack([-np.sin(th), np.cos(th)], -1)  # (c, 2) unit rod direction
        along = np.clip(points @ direction.T, 0.0, length)  # (n*n, c) projection on the segment
        dx = points[:, None, 0] - along * direction[None, :, 0]
        dy = points[:, None, 1] - along * direction[None, :, 1]
        inside = (dx**2 + dy**2 <= half_width**2).astype(np.float32)  # (n*n, c)
        sub = inside.T.reshape(-1, size, supersample, size, supersample)
        frames[start : start + chunk] = sub.mean(axis=(2, 4))
    return frames.reshape(theta.shape + (size, size))


def _config(
    num_sequences, length, size, seed, controls, dt, substeps, max_torque, supersample,
    initial_velocity,
):  # fmt: skip
    return {
        "name": "pendulum_images",
        "version": VERSION,
        "num_sequences": int(num_sequences),
        "length": int(length),
        "size": int(size),
        "seed": int(seed),
        "controls": bool(controls),
        "dt": float(dt),
        "substeps": int(substeps),
        "max_torque": float(max_torque),
        "supersample": int(supersample),
        "initial_velocity": float(initial_velocity),
    }


def _generate(config: dict) -> dict:
    rng = np.random.default_rng(config["seed"])
    N, T = config["num_sequences"], config["length"]
    theta0 = rng.uniform(-np.pi, np.pi, N)
    v = config["initial_velocity"]
    omega0 = rng.uniform(-v, v, N)
    if config["controls"]:
        torques = rng.uniform(-config["max_torque"], config["max_torque"], (N, T))
    else:
        torques = np.zeros((N, T))
    states = simulate_pendulum(
        theta0, omega0, torques, dt=config["dt"], substeps=config["substeps"]
    )
    images = render_pendulum(states[..., 0], config["size"], config["supersample"])
    out = {
        "images": images[..., None],
        "states": np.stack([wrap_angle(states[..., 0]), states[..., 1]], -1).astype(np.float32),
    }
    if config["controls"]:
        out["actions"] = torques[..., None].astype(np.float32)
    return out


def _metadata(config: dict, key: str) -> dict:
    return {
        "config": config,
        "key": key,
        "physics": (
            "theta'' = (3 g / (2 l)) sin(theta) + 3 u / (m l^2), g=10, m=l=1 (gym Pendulum), "
            f"theta from upright, counter-clockwise; RK4 with {config['substeps']} substeps "
            f"per frame interval dt={config['dt']}; theta_0 ~ U(-pi, pi), "
            f"theta'_0 ~ U(-{config['initial_velocity']}, {config['initial_velocity']})"
        ),
        "controls": (
            f"u_t ~ U(-{config['max_torque']}, {config['max_torque']}) held after frame t"
            if config["controls"]
            else "none"
        ),
        "states": "(theta wrapped to [-pi, pi), theta') at each frame",
        "images": (
            f"{config['size']}x{config['size']} grayscale in [0, 1]: rod of length "
            f"{ROD_LENGTH} * size and width {ROD_WIDTH} * size from the centre towards "
            f"(-sin theta, cos theta) (x right, y up), {config['supersample']}x supersampled"
        ),
    }


def pendulum_images(
    num_sequences: int = 500,
    length: int = 15,
    size: int = 16,
    seed: int = 0,
    controls: bool = False,
    cache_dir: str | os.PathLike | None = None,
    *,
    dt: float = 0.05,
    substeps: int = 20,
    max_torque: float = 2.0,
    supersample: int = 8,
    initial_velocity: float = 1.0,
    cache: bool = True,
) -> dict:
    """The pendulum image set (equations and geometry in the module docstring).

    Args:
        num_sequences, length: ``N`` sequences of ``T`` frames (EKVAE: 500 of 15).
        size: image side in pixels (EKVAE: 16).
        seed: the only source of randomness (initial states, torques); use another seed for a
            held-out set.
        controls: draw random torques and return them as ``actions``.
        cache_dir: where to cache (default :func:`default_cache_dir`).
        dt, substeps: frame interval and RK4 steps per interval.
        max_torque: torque bound with ``controls``.
        supersample: sub-pixels per pixel side for anti-aliasing.
        initial_velocity: ``theta'_0 ~ U(-initial_velocity, initial_velocity)`` (gym: 1).
        cache: read and write the cache (``False``: always simulate, write nothing).

    Returns:
        ``{"images": (N, T, size, size, 1) float32 in [0, 1], "states": (N, T, 2) float32
        (wrapped angle, angular velocity), "actions": (N, T, 1) float32 (only with
        controls), "metadata": dict}``; ``metadata["cache_path"]`` names the ``.npz`` (or is
        ``None`` without cache).
    """
    if num_sequences < 1 or length < 1:
        raise ValueError(f"need num_sequences >= 1 and length >= 1, got {num_sequences}, {length}")
    if (
        size < 4 or supersample < 1 or substeps < 1 or not dt > 0 or max_torque < 0
        or initial_velocity < 0
    ):  # fmt: skip
        raise ValueError(
            f"bad configuration: size={size} (>= 4), supersample={supersample} (>= 1), "
            f"substeps={substeps} (>= 1), dt={dt} (> 0), max_torque={max_torque} (>= 0), "
            f"initial_velocity={initial_velocity} (>= 0)"
        )
    config = _config(
        num_sequences, length, size, seed, controls, dt, substeps, max_torque, supersample,
        initial_velocity,
    )  # fmt: skip
    return cached("pendulum", config, _generate, _metadata, cache=cache, cache_dir=cache_dir)


def cached(
    prefix: str,
    config: dict,
    generate: Callable[[dict], dict],
    describe: Callable[[dict, str], dict],
    *,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> dict:
    """``{**generate(config), "metadata": describe(config, key) + cache_path}``, the arrays read
    from / written to ``<cache_dir>/<prefix>_<key>.npz`` (metadata beside it as ``.json``),
    ``key`` a hash of the JSON ``config`` (which must hold everything the data depend on).
    ``cache=False``: always generate, write nothing (``cache_path`` is ``None``). Written to a
    temporary file and renamed, so readers never see a partial file."""
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:20]
    metadata = describe(config, key)
    if not cache:
        return {**generate(config), "metadata": {**metadata, "cache_path": None}}
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"{prefix}_{key}.npz"
    data = _load(path)
    if data is None:
        data = generate(config)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **data)
        os.replace(tmp, path)
        path.with_suffix(".json").write_text(json.dumps(metadata, indent=2))
    return {**data, "metadata": {**metadata, "cache_path": str(path)}}


def _load(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        return None  # a damaged cache file is regenerated


def flatten_images(images: np.ndarray) -> np.ndarray:
    """``(N, T, H, W, C) -> (N, T, H * W * C)``: frames as vectors for MLP models."""
    images = np.asarray(images)
    if images.ndim != 5:
        raise ValueError(f"images have shape {images.shape}, expected (N, T, H, W, C)")
    return images.reshape(*images.shape[:2], -1)


def unflatten_images(flat: np.ndarray, size: int, channels: int = 1) -> np.ndarray:
    """Inverse of :func:`flatten_images`: ``(..., size * size * channels) -> (..., size, size,
    channels)``."""
    flat = np.asarray(flat)
    if flat.shape[-1] != size * size * channels:
        raise ValueError(f"last axis {flat.shape[-1]} != {size}*{size}*{channels}")
    return flat.reshape(*flat.shape[:-1], size, size, channels)


def model_data(data: dict) -> dict:
    """The keyword arguments of a pssm model: ``{"obs": (N, T, 256)[, "actions": (N, T, 1)]}``."""
    out = {"obs": flatten_images(data["images"])}
    if "actions" in data:
        out["actions"] = np.asarray(data["actions"])
    return out
