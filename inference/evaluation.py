"""Evaluation of learned state space models: arrays in, numbers and figures out.

The metrics of Klushyn et al. (2021, "Latent Matters: Learning Deep State-Space Models",
Sec. 6.2-6.3, Tables 1-2), after Karl et al. (2017, DVBF):

* System identification, :func:`r2_ols`: the coefficient of determination of an ordinary
  least-squares regression with intercept from latent means ``x_i`` (``(N, d)``) to ground-truth
  quantities ``y_i`` (``(N, k)``), per target ``j``:

      beta = argmin_{b, c} sum_i (y_ij - c - x_i^T b)^2,
      R^2_j = 1 - sum_i (y_ij - yhat_ij)^2 / sum_i (y_ij - mean_i y_ij)^2,

  on the fitted rows (in-sample, as the papers report) or on held-out rows (out-of-sample:
  may be negative; ~0 when the latents carry no information). An angle is a circle, which no
  linear map of a well-behaved latent reproduces across the ``+-pi`` cut: regress onto
  ``(sin theta, cos theta)`` and report their R^2 (the pendulum example averages the two);
  the angular velocity is regressed as is.
* Prediction, :func:`open_loop_mse`: the mean squared error of ``n``-step open-loop predictions
  against held-out observations, per horizon step, starting from a belief conditioned on a
  context window. EKVAE's "smoothed" prediction starts from ``z_1 ~ q(z_1 | x_{1:5})``, its
  "filtered" one from ``z_5 ~ q(z_5 | x_{1:5})``; the start is the caller's choice, the
  prediction a callable. :func:`world_model_open_loop_mse` is the filtered variant for any
  object with the attributes of ``rl.world_model.WorldModel`` (duck-typed: nothing here
  imports ``rl``).
* :func:`heldout_elbo`: the ELBO metric of an ``inference.training.Objective`` on a held-out
  batch, averaged over particles.

Figures (matplotlib, Agg canvas, no global pyplot state): :func:`save_image_grid`,
:func:`plot_latent_trajectories` (mean +- 2 standard deviations), :func:`plot_latent_space`.
"""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from inference.training.objective import cache_per_objective

PyTree = Any


# ---- system identification ---------------------------------------------------------------------


def _design(x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.ones((x.shape[0], 1)), x], axis=1)


def r2_ols(
    latents: np.ndarray,
    targets: np.ndarray,
    *,
    fit_fraction: float = 1.0,
) -> np.ndarray:
    """Per-target R^2 of an OLS regression with intercept from ``latents`` to ``targets``.

    Args:
        latents: ``(N, d)`` regressors (e.g. posterior means), or ``(N, T, d)`` sequences.
        targets: ``(N,)`` / ``(N, k)``, or ``(N, T)`` / ``(N, T, k)`` with sequences.
        fit_fraction: fraction of the rows (of the *sequences* for 3-d inputs, so that
            held-out frames come from unseen sequences) used to fit, the first ones in order;
            R^2 is computed on the rest. ``1.0``: fit and score on all rows (in-sample).

    Returns:
        ``(k,)`` float64: ``1 - SSE / SST`` per target (``nan`` where the scored target is
        constant).
    """
    x = np.asarray(latents, np.float64)
    y = np.asarray(targets, np.float64)
    seq = x.ndim == 3
    if x.ndim not in (2, 3):
        raise ValueError(f"latents have shape {x.shape}, expected (N, d) or (N, T, d)")
    if y.ndim == x.ndim - 1:
        y = y[..., None]
    if y.ndim != x.ndim or y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"targets {np.shape(targets)} do not match latents {x.shape}")
    if not 0.0 < fit_fraction <= 1.0:
        raise ValueError(f"fit_fraction={fit_fraction} must lie in (0, 1]")
    n = x.shape[0]
    n_fit = n if fit_fraction == 1.0 else int(round(fit_fraction * n))
    if n_fit < 1 or (fit_fraction < 1.0 and n_fit >= n):
        raise ValueError(f"fit_fraction={fit_fraction} leaves no rows to fit or to score")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("latents and targets must be finite")
    flat = (lambda a: a.reshape(-1, a.shape[-1])) if seq else (lambda a: a)
    x_fit, y_fit = flat(x[:n_fit]), flat(y[:n_fit])
    x_ev, y_ev = (x_fit, y_fit) if n_fit == n else (flat(x[n_fit:]), flat(y[n_fit:]))
    beta, *_ = np.linalg.lstsq(_design(x_fit), y_fit, rcond=None)
    sse = np.sum((y_ev - _design(x_ev) @ beta) ** 2, axis=0)
    sst = np.sum((y_ev - y_ev.mean(axis=0)) ** 2, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 0, 1.0 - sse / np.where(sst > 0, sst, 1.0), np.nan)


# ---- prediction ------------------------------------------------------------------------------


class OpenLoopResult(NamedTuple):
    """Open-loop prediction errors.

    Attributes:
        mse: scalar, mean over sequences, horizon steps and features.
        per_step: ``(n,)`` mean over sequences and features at each horizon step
            ``k = 1..n``.
        predictions: ``(B, n, ...)`` the predicted observation means (averaged over samples).
    """

    mse: float
    per_step: np.ndarray
    predictions: np.ndarray


def open_loop_mse(
    predict: Callable[[PyTree, jax.Array, PyTree, Any], Any],
    params: PyTree,
    key: jax.Array,
    belief: PyTree,
    actions: Any,
    targets: jax.Array,
    *,
    num_samples: int = 1,
) -> OpenLoopResult:
    """MSE of open-loop predictions ``predict(params, key, belief, actions) -> (B, n, ...)``
    against ``targets`` ``(B, n, ...)``, per horizon step.

    Args:
        predict: the model's prediction of the next ``n`` observation means from ``belief``
            under ``actions`` (``(B, n, u)`` or ``None``), without further observations.
        params: passed to ``predict``.
        key: randomness of ``predict``; sample ``i`` uses ``jax.random.split(key, num_samples)
            [i]``.
        belief: the start, conditioned on a context window (filtered or smoothed).
        targets: the held-out observations the predictions are scored against.
        num_samples: predictions averaged (Monte Carlo predictive mean) before scoring.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    keys = jax.random.split(key, num_samples)
    pred = sum(np.asarray(predict(params, k, belief, actions), np.float64) for k in keys)
    pred = pred / num_samples
    target = np.asarray(targets, np.float64)
    if pred.shape != target.shape or pred.ndim < 2:
        raise ValueError(f"predictions {pred.shape} and targets {target.shape} differ (B, n, ...)")
    err = (pred - target) ** 2
    per_step = err.reshape(err.shape[0], err.shape[1], -1).mean(axis=(0, 2))
    return OpenLoopResult(float(err.mean()), per_step, pred)


def _time_slice(x, start, stop):
    return jax.tree.map(lambda v: v[:, start:stop], x)


def filter_beliefs(wm, params, key, obs, actions, mask=None):
    """Beliefs after each observation: ``b_t = p(z_t | o_{0:t}, a_{0:t-1})``, ``(B, T, ...)``,
    of a world model with the protocol of :class:`rl.world_model.WorldModel`.

    Uses ``wm.filter_sequence`` when the model has one, else scans ``observe`` and ``imagine``
    (``actions[:, t]`` moves ``b_t`` to the prior of ``z_{t+1}``; the last action is unused).
    """
    if getattr(wm, "filter_sequence", None) is not None:
        return wm.filter_sequence(params, key, obs, actions, mask)
    B, T = jax.tree.leaves(obs)[0].shape[:2]
    mask = jnp.ones((B, T), bool) if mask is None else jnp.asarray(mask)
    keys = jax.random.split(key, (T, 2))  # typed or raw keys alike
    b = wm.init_belief(params, B)
    b = wm.observe(params, keys[0, 0], b, jax.tree.map(lambda v: v[:, 0], obs), mask[:, 0])

    def step(b, xs):
        k, a_prev, o, m = xs
        b = wm.observe(params, k[1], wm.imagine(params, k[0], b, a_prev), o, m)
        return b, b

    xs = (
        keys[1:],
        jnp.moveaxis(actions[:, :-1], 1, 0),
        jax.tree.map(lambda v: jnp.moveaxis(v[:, 1:], 1, 0), obs),
        jnp.moveaxis(mask[:, 1:], 1, 0),
    )
    _, bs = jax.lax.scan(step, b, xs)
    join = lambda b0, rest: jnp.concatenate([b0[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)
    return jax.tree.map(join, b, bs)


def imagine_rollout(wm, params, key, belief, policy=None, horizon: int | None = None, *,
                    actions=None, rewards: bool = True):  # fmt: skip
    """Roll a world model forward from ``belief`` ``(B, ...)`` for ``horizon`` ``imagine`` steps:
    the one rollout that planning, imagined training and open-loop prediction all use.

    Each step ``k`` takes ``a_k = policy(features(b_k), key_k)`` (Dreamer's imagined
    trajectories; gradients flow through the dynamics) or ``actions[:, k]`` (``(B, H, u)``:
    PlaNet's candidates, recorded actions; ``horizon`` defaults to ``H``), then
    ``b_{k+1} = imagine(b_k, a_k)``.

    Returns:
        ``(features (H+1, B, F), actions (H, B, u), rewards (H, B))``: the features of the
        start and of every imagined state, the actions taken and the predicted rewards of
        arriving in each state (``None`` with ``rewards=False``, for models without a head).
    """
    if (policy is None) == (actions is None):
        raise ValueError("give exactly one of policy and actions")
    given = None if actions is None else jnp.moveaxis(jnp.asarray(actions), 1, 0)
    horizon = given.shape[0] if horizon is None else int(horizon)

    def step(b, xs):
        k, a = xs
        k_pi, k_dyn = jax.random.split(k)
        if a is None:
            a = policy(wm.features(params, b), k_pi)
        b = wm.imagine(params, k_dyn, b, a)
        f = wm.features(params, b)
        return b, (f, a, wm.reward(params, f) if rewards else None)

    keys = jax.random.split(key, horizon)
    _, (f, a, r) = jax.lax.scan(step, belief, (keys, given))
    return jnp.concatenate([wm.features(params, belief)[None], f], axis=0), a, r


def world_model_predict(wm) -> Callable:
    """``predict(params, key, belief, actions (B, n, u)) -> (B, n, ...)`` for a world model:
    :func:`imagine_rollout` under ``actions``, every imagined state decoded
    (``decode(features(b))``); ``actions[:, k]`` moves the belief to step ``k + 1``."""
    if getattr(wm, "decode", None) is None:
        raise ValueError("the world model has no decode function: it cannot predict observations")

    def predict(params, key, belief, actions):
        f, _, _ = imagine_rollout(wm, params, key, belief, actions=actions, rewards=False)
        out = wm.decode(params, f[1:])
        return jax.tree.map(lambda v: jnp.moveaxis(v, 0, 1), out)

    return predict


def world_model_open_loop_mse(
    wm,
    params: PyTree,
    key: jax.Array,
    obs: jax.Array,
    actions: jax.Array | None,
    *,
    context: int,
    mask: jax.Array | None = None,
    num_samples: int = 1,
) -> OpenLoopResult:
    """Filtered-start open-loop MSE of a world model (duck-typed ``rl.world_model.WorldModel``:
    ``init_belief``, ``observe``, ``imagine``, ``features``, ``decode``, ``action_dim`` and
    optionally ``filter_sequence``).

    The belief after observing ``o_{0:context-1}`` is rolled forward by ``imagine`` under
    ``a_{context-1..T-2}`` and decoded; the predictions of ``o_{context..T-1}`` are scored
    against ``obs`` (one array ``(B, T, ...)``). ``actions=None`` means an action-free model
    (``action_dim == 0``): zero-width actions are passed.
    """
    obs = jnp.asarray(obs)
    B, T = obs.shape[:2]
    if not 1 <= context < T:
        raise ValueError(f"context={context} must lie in [1, T={T})")
    if actions is None:
        actions = jnp.zeros((B, T, int(getattr(wm, "action_dim", 0))), obs.dtype)
    k_filter, k_pred = jax.random.split(key)
    ctx_mask = None if mask is None else _time_slice(mask, 0, context)
    beliefs = filter_beliefs(wm, params, k_filter, obs[:, :context], actions[:, :context], ctx_mask)
    start = jax.tree.map(lambda v: v[:, -1], beliefs)
    return open_loop_mse(
        world_model_predict(wm), params, k_pred, start, actions[:, context - 1 : T - 1],
        obs[:, context:], num_samples=num_samples,
    )  # fmt: skip


# ---- held-out ELBO ---------------------------------------------------------------------------


def heldout_elbo(
    objective, params: PyTree, aux: PyTree, key: jax.Array, batch: PyTree, num_particles: int = 16
) -> dict:
    """The objective's ``"elbo"`` metric on ``batch``, averaged over ``num_particles`` keys.

    Args:
        objective: an ``inference.training.Objective`` (``loss(params, aux, key, batch) ->
            (loss, metrics, aux)``; ``metrics["elbo"]``, else ``-loss``).
        params, aux: the *training* (unconstrained) parameters and the auxiliary state, e.g.
            ``state.params`` and ``state.aux`` of ``inference.training.fit``.
        key: particle ``i`` uses ``jax.random.split(key, num_particles)[i]``.
        batch: the held-out batch (a dict of model keyword arguments).

    Returns:
        ``{"elbo": mean, "elbo_se": standard error over particles, "elbo_per_sequence":
        mean / B}`` as floats (``B`` the leading size of the batch's arrays).
    """
    if num_particles < 1:
        raise ValueError(f"num_particles={num_particles} must be >= 1")

    elbos = _particle_elbos(objective, num_particles)
    values = np.asarray(elbos(params, aux, key, batch), np.float64)
    B = jax.tree.leaves(batch)[0].shape[0]
    se = values.std(ddof=1) / np.sqrt(num_particles) if num_particles > 1 else float("nan")
    return {"elbo": float(values.mean()), "elbo_se": float(se),
            "elbo_per_sequence": float(values.mean() / B)}  # fmt: skip


@cache_per_objective(maxsize=16)
def _particle_elbos(objective, num_particles: int):
    """The jitted ``(params, aux, key, batch) -> (num_particles,)`` ELBOs of ``objective``,
    cached per objective: scoring many parameter sets (restarts, checkpoints) compiles once."""

    def run(params, aux, key, batch):
        def one(k):
            loss, metrics, _ = objective.loss(params, aux, k, batch)
            return metrics.get("elbo", -loss)

        return jax.lax.map(one, jax.random.split(key, num_particles))

    return jax.jit(run)


# ---- figures ---------------------------------------------------------------------------------


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _as_frames(row, image_shape):
    a = np.asarray(row, np.float64)
    if image_shape is not None:
        a = a.reshape(a.shape[0], *image_shape)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (3, 4):
        raise ValueError(f"a row has frames of shape {a.shape[1:]}: pass image_shape=(H, W[, C])")
    return a


def save_image_grid(
    path,
    rows: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    *,
    image_shape: tuple[int, ...] | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    title: str | None = None,
) -> Path:
    """One row of frames per array (e.g. truth, reconstruction, prediction), one column per step.

    Args:
        path: the image file (``.png``); parent folders are created.
        rows: arrays ``(T, H, W)``, ``(T, H, W, C)`` or, with ``image_shape``, ``(T, H*W*C)``;
            rows may differ in ``T`` (missing cells stay blank).
        labels: one name per row.
        vmin, vmax: grayscale range (colour images are clipped to ``[0, 1]``).
    """
    frames = [_as_frames(r, image_shape) for r in rows]
    if labels is not None and len(labels) != len(frames):
        raise ValueError(f"{len(labels)} labels for {len(frames)} rows")
    cols = max(f.shape[0] for f in frames)
    fig = _figure(0.6 * cols + 1.2, 0.65 * len(frames) + (0.4 if title else 0.1))
    axes = fig.subplots(len(frames), cols, squeeze=False)
    for i, f in enumerate(frames):
        for t in range(cols):
            ax = axes[i, t]
            ax.set_xticks([])
            ax.set_yticks([])
            if t < f.shape[0]:
                img = f[t] if f.ndim == 3 else np.clip(f[t], 0.0, 1.0)
                ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            else:
                ax.axis("off")
            if i == 0:
                ax.set_title(str(t), fontsize=7)
        if labels is not None:
            axes[i, 0].set_ylabel(labels[i], fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_latent_trajectories(
    path,
    mean: np.ndarray,
    var: np.ndarray,
    truth: np.ndarray | None = None,
    *,
    truth_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Latent means over time with +-2 standard deviation bands, one panel per dimension, and
    the ground truth (if given) in a last panel.

    Args:
        mean, var: ``(T, d)`` posterior means and variances of one sequence.
        truth: ``(T, k)`` ground-truth quantities (e.g. angle, velocity).
    """
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    if mean.ndim != 2 or var.shape != mean.shape:
        raise ValueError(f"mean {mean.shape} and var {var.shape} must both be (T, d)")
    if np.any(var < 0):
        raise ValueError("variances must be non-negative")
    T, d = mean.shape
    panels = d + (truth is not None)
    fig = _figure(6.0, 1.1 * panels + 0.5)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    t = np.arange(T)
    for j in range(d):
        sd = np.sqrt(var[:, j])
        axes[j].fill_between(t, mean[:, j] - 2 * sd, mean[:, j] + 2 * sd, alpha=0.3, lw=0)
        axes[j].plot(t, mean[:, j], lw=1.2)
        axes[j].set_ylabel(f"z[{j}]", fontsize=8)
    if truth is not None:
        truth = np.asarray(truth, np.float64).reshape(T, -1)
        for j in range(truth.shape[1]):
            label = truth_labels[j] if truth_labels is not None else f"truth[{j}]"
            axes[-1].plot(t, truth[:, j], lw=1.2, label=label)
        axes[-1].legend(fontsize=7, loc="upper right")
        axes[-1].set_ylabel("truth", fontsize=8)
    axes[-1].set_xlabel("time step")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_latent_space(
    path,
    latents_2d: np.ndarray,
    colour_by: np.ndarray,
    *,
    label: str = "",
    title: str | None = None,
    cmap: str = "twilight",
) -> Path:
    """Scatter of latent points coloured by a ground-truth quantity (EKVAE Fig. 2/5).

    Args:
        latents_2d: ``(N, 2)`` points, or ``(N, d)`` with ``d > 2``: then projected on their
            first two principal components (axes labelled ``PC1``, ``PC2``).
        colour_by: ``(N,)`` values (e.g. the angle; ``cmap="twilight"`` is cyclic).
    """
    x = np.asarray(latents_2d, np.float64)
    c = np.asarray(colour_by, np.float64).reshape(-1)
    if x.ndim != 2 or x.shape[1] < 2 or c.shape[0] != x.shape[0]:
        raise ValueError(f"need latents (N, >=2) and colours (N,), got {x.shape}, {c.shape}")
    names = ("z[0]", "z[1]")
    if x.shape[1] > 2:
        centred = x - x.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        x, names = centred @ vt[:2].T, ("PC1", "PC2")
    fig = _figure(4.6, 4.0)
    ax = fig.subplots()
    points = ax.scatter(x[:, 0], x[:, 1], c=c, s=4, cmap=cmap)
    fig.colorbar(points, ax=ax, label=label)
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
