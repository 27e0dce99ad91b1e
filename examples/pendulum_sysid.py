"""System identification on the 16x16 pendulum images (Klushyn et al. 2021, "Latent Matters",
Sec. 6.2-6.3, Tables 1-2; data set of Karl et al. 2017, DVBF).

Each model of :data:`MODELS` is trained by ``inference.training.fit`` on ``N`` sequences of
``T`` flattened frames (``pssm.datasets.pendulum_images``, 256 pixels in ``[0, 1]``) and
evaluated on held-out sequences (another seed):

* **R^2** (:func:`inference.evaluation.r2_ols`): OLS with intercept from the latent posterior
  means of every frame to the ground truth, fitted on the *training* sequences and scored on
  the *held-out* ones (in-sample values, as the papers report them, are in the JSON). The
  angle is regressed onto ``(sin theta, cos theta)`` (a circle; see the evaluation module) and
  its R^2 is the mean of the two; the angular velocity is regressed as is.
* **open-loop MSE** (per pixel, :func:`inference.evaluation.open_loop_mse`) from the first
  ``context`` frames (EKVAE: 5): *filtered* start, the latent path over the context sampled
  from the guide given ``o_{0:c-1}`` and ``o_{c..T-1}`` predicted by the model's prior; and
  *smoothed* start, only ``z_0 ~ q(z_0 | o_{0:c-1})`` kept and ``o_{1..T-1}`` predicted (the
  EKVAE's Table-1 protocol; the RSSM and KVAE fail it, Table 2). The prediction is generic
  over NumPyro models with the sites of :mod:`pssm.core`: the guide's latent prefix is
  substituted into the model's ``"z_0"`` / ``"z"`` sites and NumPyro's ``scan`` samples the
  rest from the prior (a prefix substitution); frames after the prefix are masked, and the
  prediction is the mean of the ``"obs"`` site.
* the held-out ELBO per sequence (:func:`inference.evaluation.heldout_elbo`).

Models (:data:`MODELS`: name -> builder ``args -> ModelEntry``). ``rssm``, ``vrkn`` and
``kalmamba`` are the agents' models, built by the one model registry (:func:`rl.models.parts`,
without the reward head, sized by ``--latent``/``--deter``/``--hidden``); the entry here adds
only what R^2 is computed from and a note. Each one's world model (the belief step an agent
filters with) also gives the filtered forecast ``mse_filtered_world_model``, an independent
implementation of the same prediction as the generic one below:

* ``locally_linear`` (:mod:`pssm.locally_linear`) with the ``kalman_smoothing`` guide under
  ``TraceMeanField_ELBO`` (VRKN bound); latents: the smoothed means of its latent LGSSM. Its
  transitions are linearised *at the observed frames* (``A_t, b_t`` from the encoded
  ``o_t``), so open-loop it runs on the masked-step input (fused latent observation 0): that
  prediction is the model's own semantics, not a strong forecaster (VRKN proper linearises at
  the filtered mean).
* ``rssm`` (:mod:`pssm.rssm`) with the amortised ``filtering`` guide; latents: the stochastic
  ``z`` alone, the deterministic ``h`` alone, and the features ``[h, z]``. The EKVAE paper's
  finding (Table 2): the velocity is carried by ``h``, not by ``z`` (low R^2 from ``z``).
* ``vrkn`` (:mod:`pssm.vrkn`, linearised at the filtered mean, MC dropout) and ``kalmamba``
  (:mod:`pssm.kalmamba`, Mamba backbone) with the ``kalman_smoothing`` guide, each trained with
  its own objective (free nats; Mahalanobis regulariser); latents: smoothed means, for
  KalMamba also the backbone output ``m_t`` and the transition offsets ``b_t = dyn(m_t)``
  (KalMamba's ``z`` has a memory outside it, as the RSSM's ``z`` has ``h``: the velocity can
  move ``z`` through ``b_t`` without being in ``z``). Not in the default ``--models``.

Baselines: the mean training frame and the last context frame (persistence) as predictions;
the first 8 principal components of a single frame as "latents" (angle yes, velocity no).

Run ``python -m examples.pendulum_sysid [--steps 3000] [--models locally_linear,rssm,vrkn]``
(``--quick`` for a smoke run). Writes ``results.json``, ``results.md``, each model's trained
parameters ``<model>_params.npz`` (:func:`inference.training.checkpoint.load_params`) and
figures under ``--out`` (default ``runs/pendulum_sysid``): image grids (truth / reconstruction /
filtered / smoothed-start predictions), latent trajectories with +-2 sd bands and latent spaces
coloured by the angle.
"""

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro import handlers
from numpyro.infer import TraceMeanField_ELBO

from inference import evaluation, guides, kalman, training
from inference.objectives import FreeNatsELBO
from inference.training.checkpoint import load_params, save_params
from pssm import datasets
from pssm.locally_linear import locally_linear

# ---- the model registry ------------------------------------------------------------------------


class ModelEntry(NamedTuple):
    """What the experiment needs of a model.

    Attributes:
        model, guide: NumPyro model and guide with the sites of :mod:`pssm.core` and the
            observation site ``"obs"`` (one array).
        elbo: the NumPyro ELBO (or ``MetricsELBO`` wrapper) to train with.
        latents: ``(params, key, batch) -> {name: (mean (B, T, k), var (B, T, k) or None)}``,
            the latent posterior means (and variances) R^2 is computed from, per latent set.
        note: a remark printed under the results table.
        world_model: optional ``rl.world_model.WorldModel`` over the same parameter sites (the
            registry's models): its filtered open-loop MSE (``observe`` / ``imagine`` /
            ``decode``, :func:`inference.evaluation.world_model_open_loop_mse`) is reported next
            to the generic one, an independent implementation of the same prediction.
    """

    model: Callable
    guide: Callable
    elbo: Any
    latents: Callable
    note: str = ""
    world_model: Any = None


def _traces(model, guide, params, key, batch):
    k_guide, k_model = jax.random.split(key)
    g = handlers.trace(handlers.seed(handlers.substitute(guide, params), k_guide))
    g = g.get_trace(**batch)
    samples = {k: v for k, v in g.items() if v["type"] == "sample"}  # replay latents only
    m = handlers.replay(handlers.seed(handlers.substitute(model, params), k_model), samples)
    return g, handlers.trace(m).get_trace(**batch)


def _path(tr, attribute):
    """``(B, T, d)`` from the sites ``"z_0"`` ``(B, d)`` and ``"z"`` ``(T-1, B, d)``."""
    first, rest = (getattr(tr[s]["fn"], attribute) for s in ("z_0", "z"))
    return jnp.concatenate([first[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)


def guide_site_latents(model, guide):
    """Fallback: means / variances of the guide's factors ``q(z_t | z_{t-1}, o)`` along one
    sampled path (the RSSM posterior's own means; for a forward-sampled smoothing guide the
    smoothed dynamics' means given the sampled previous state)."""

    def latents(params, key, batch):
        g, _ = _traces(model, guide, params, key, batch)
        return {"z": (_path(g, "mean"), _path(g, "variance"))}

    return latents


def smoothed_latents(model):
    """Smoothed means and variances of the model's latent LGSSM (``model.structure``)."""

    def latents(params, key, batch):
        # seeded: a structure may draw latent sites of its own (VRKN's MC-dropout masks)
        with handlers.block(), handlers.seed(rng_seed=key), handlers.substitute(data=params):
            s = model.structure(**batch)
        post = jax.vmap(kalman.smoother)(*s).smoothed
        var = post.cov if post.cov.shape == post.mean.shape else jnp.diagonal(post.cov, 0, -2, -1)
        return {"z": (post.mean, var)}

    return latents


def kalmamba_latents(model):
    """KalMamba: the smoothed ``z``, the backbone's output ``m_t`` (which sees the frames up to
    ``t`` and sets the dynamics; like the RSSM's ``h`` it can carry what ``z`` does not) and the
    transition offsets ``b_t = dyn(m_t)`` of ``z_{t+1} = A_t z_t + b_t`` (steps ``0..T-2``): what
    the backbone adds to ``z``'s motion."""
    smoothed = smoothed_latents(model)

    def latents(params, key, batch):
        with handlers.block(), handlers.substitute(data=params):
            f = model.forward(model.prepare(batch["obs"], batch.get("actions")))
        return {
            **smoothed(params, key, batch),
            "m": (f.m, None),
            "b": (f.structure.dynamics.b, None),
        }

    return latents


def rssm_latents(model, guide):
    """``z`` (the filtering posterior's means), ``h`` (the deterministic path recomputed from
    the guide's samples) and the features ``[h, z]``."""

    def latents(params, key, batch):
        g, m = _traces(model, guide, params, key, batch)
        z, h = _path(g, "mean"), m["h"]["value"]
        features = jnp.concatenate([h, z], axis=-1)
        return {"z": (z, _path(g, "variance")), "h": (h, None), "[h, z]": (features, None)}

    return latents


def build_locally_linear(args) -> ModelEntry:
    model = locally_linear(
        256, args.latent, args.action_dim, hidden=(args.hidden,), obs_var=args.obs_var,
        seed=args.seed,
    )  # fmt: skip
    note = (
        "locally_linear: transitions are linearised at the observed frames (A_t, b_t from the "
        "encoded o_t), so open-loop it runs on the masked-step input (fused latent observation "
        "0): its prediction MSE shows that limitation, not a tuned forecaster."
    )
    return ModelEntry(
        model, guides.kalman_smoothing(model), TraceMeanField_ELBO(), smoothed_latents(model),
        note,
    )  # fmt: skip


def _from_registry(name: str, args, latents: Callable, note: str, **overrides) -> ModelEntry:
    """The registry's model ``name`` (:func:`rl.models.parts`, the agents' model) without a
    reward head, sized by the arguments, with its world model (``observe`` / ``imagine`` /
    ``decode``) for the independent filtered forecast."""
    from rl.models import parts
    from rl.presets import PRESETS
    from rl.world_model import from_parts

    # "objective": each family's own ELBO (the RL presets' default is the KalMamba paper's KL
    # balancing, a choice for RL; VRKN passes its free nats below)
    sizes = dict(latent=args.latent, stoch=args.latent, deter=args.deter, d_model=args.deter,
                 model_hidden=args.hidden, objective="elbo")  # fmt: skip
    made = parts(
        name, 256, args.action_dim, {**PRESETS["cpu"]["*"], **sizes}, args.seed, reward=False,
        obs_var=args.obs_var, **overrides,
    )  # fmt: skip
    return ModelEntry(
        made.model, made.guide, made.elbo, latents(made), note, world_model=from_parts(made)
    )


def build_rssm(args) -> ModelEntry:
    note = (
        "rssm: the filtering guide sees no future frame, so z_0 given the context is "
        "q(z_0 | o_0) and the velocity is unknown at the start (EKVAE Table 2)."
    )
    return _from_registry("rssm", args, lambda p: rssm_latents(p.model, p.guide), note)


def build_vrkn(args) -> ModelEntry:
    note = (
        f"vrkn: trained with its own objective (free nats {args.free_nats:g} per step, MC "
        "dropout 0.1); latents and predictions under one draw of the dropout masks."
    )
    return _from_registry(
        "vrkn", args, lambda p: smoothed_latents(p.model), note, mlp_hidden=(args.hidden,),
        observed_dim=args.observed, elbo=FreeNatsELBO(args.free_nats),
    )  # fmt: skip


def build_kalmamba(args) -> ModelEntry:
    note = (
        f"kalmamba: trained with its own objective (Mahalanobis regulariser, alpha "
        f"{args.alpha:g}, MC dropout); latents: the smoothed z and the backbone output m; "
        "open-loop its backbone sees masked steps (no observation)."
    )
    parallel = args.parallel if args.parallel is not None else jax.default_backend() != "cpu"
    return _from_registry(
        "kalmamba", args, lambda p: kalmamba_latents(p.model), note, hidden=(args.hidden,),
        num_blocks=1, d_state=16, observed_dim=args.observed, parallel=parallel,
        alpha=args.alpha,
    )  # fmt: skip


# the models: locally_linear (which cannot act: no belief step) and the families of the agents'
# registry rl.models (add one there; here only what R^2 is computed from)
MODELS: dict[str, Callable[[argparse.Namespace], ModelEntry]] = {
    "locally_linear": build_locally_linear,
    "rssm": build_rssm,
    "vrkn": build_vrkn,
    "kalmamba": build_kalmamba,
}


# ---- prediction --------------------------------------------------------------------------------


def start_belief(entry: ModelEntry, params, key, batch, *, context: int, keep: int) -> dict:
    """The guide's latent path given ``o_{0:context-1}``, cut to its first ``keep`` steps, with
    the observations and actions of those steps: ``{"z_0", "z" (keep-1, B, d), "batch"}``."""
    ctx = {k: v[:, :context] for k, v in batch.items()}
    g = handlers.trace(handlers.seed(handlers.substitute(entry.guide, params), key))
    g = g.get_trace(**ctx)
    return {
        "z_0": g["z_0"]["value"],
        "z": g["z"]["value"][: keep - 1],
        "batch": {k: v[:, :keep] for k, v in ctx.items()},
    }


def predictor(entry: ModelEntry, horizon: int) -> Callable:
    """``predict(params, key, belief, actions) -> (B, horizon, p)``: the model's ``"obs"`` means
    for the ``horizon`` steps after the belief's prefix, with the prefix substituted into
    ``"z_0"`` / ``"z"`` and the rest sampled from the prior (``actions``: ``(B, horizon, u)``
    for the steps after the prefix, or ``None`` for a model without actions)."""

    def predict(params, key, belief, actions):
        prefix = belief["batch"]
        obs = prefix["obs"]
        B, keep, p = obs.shape
        batch = {"obs": jnp.concatenate([obs, jnp.zeros((B, horizon, p), obs.dtype)], 1)}
        if actions is not None:
            batch["actions"] = jnp.concatenate([prefix["actions"], actions], axis=1)
        batch["mask"] = jnp.broadcast_to(jnp.arange(keep + horizon) < keep, (B, keep + horizon))
        sites = {"z_0": belief["z_0"]}
        if keep > 1:
            sites["z"] = belief["z"]
        model = handlers.substitute(handlers.substitute(entry.model, params), data=sites)
        tr = handlers.trace(handlers.seed(model, key)).get_trace(**batch)
        return tr["obs"]["fn"].mean[:, keep:]

    return predict


def prediction_mse(entry, params, key, batch, *, context, keep, num_samples=1):
    """Open-loop MSE of frames ``keep..T-1`` from the first ``keep`` latent steps of the guide's
    path given the first ``context`` frames."""
    horizon = batch["obs"].shape[1] - keep
    k_start, k_pred = jax.random.split(key)
    start = jax.jit(functools.partial(start_belief, entry, context=context, keep=keep))
    actions = batch["actions"][:, keep:] if "actions" in batch else None
    return evaluation.open_loop_mse(
        jax.jit(predictor(entry, horizon)), params, k_pred, start(params, k_start, batch),
        actions, batch["obs"][:, keep:], num_samples=num_samples,
    )  # fmt: skip


def reconstruct(entry, params, key, batch):
    """Posterior reconstruction: the ``"obs"`` means with the guide's path given all frames."""
    _, m = _traces(entry.model, entry.guide, params, key, batch)
    return m["obs"]["fn"].mean


# ---- the experiment ----------------------------------------------------------------------------


def _targets(states: np.ndarray) -> np.ndarray:
    """``(N, T, 3)``: ``sin theta, cos theta, theta'`` per frame."""
    theta, omega = states[..., 0], states[..., 1]
    return np.stack([np.sin(theta), np.cos(theta), omega], -1).astype(np.float64)


def _r2(train_x, test_x, train_y, test_y) -> dict:
    """Held-out (fit on the training sequences, scored on the held-out ones) and in-sample R^2:
    angle = mean over (sin, cos), velocity. Latents covering the first ``T' < T`` steps only
    (transition offsets) are scored on those steps."""
    steps = train_x.shape[1]
    train_y, test_y = train_y[:, :steps], test_y[:, :steps]
    n = train_x.shape[0]
    both_x, both_y = np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])
    held = evaluation.r2_ols(both_x, both_y, fit_fraction=n / both_x.shape[0])
    ins = evaluation.r2_ols(train_x, train_y)
    return {
        "r2_angle": float(held[:2].mean()), "r2_velocity": float(held[2]),
        "r2_angle_in_sample": float(ins[:2].mean()), "r2_velocity_in_sample": float(ins[2]),
        "r2_sin_cos_velocity": held.tolist(),
    }  # fmt: skip


def _pad_left(frames: np.ndarray, T: int) -> np.ndarray:
    pad = np.full((T - frames.shape[0], *frames.shape[1:]), np.nan)
    return np.concatenate([pad, frames])


def _batch(data: dict) -> dict:
    return {k: jnp.asarray(v, float) for k, v in datasets.model_data(data).items()}


def _evaluation_keys(seed: int) -> list[jax.Array]:
    """The keys of the latents, held-out ELBO, filtered and smoothed forecasts, reconstruction."""
    return list(jax.random.split(jax.random.key(seed + 7), 5))


def latent_r2(entry, params, key, train, test) -> tuple[dict, dict]:
    """``({set: (held-out means, variances or None)}, {set: {"latent_dim", R^2 ...}})`` for
    every latent set of ``entry.latents`` (:func:`_r2`)."""
    train_batch, test_batch = _batch(train), _batch(test)
    n = train_batch["obs"].shape[0]  # one compiled call for both sets
    both = {k: jnp.concatenate([v, test_batch[k]]) for k, v in train_batch.items()}
    lat = jax.jit(entry.latents)(params, key, both)
    y_train, y_test = _targets(train["states"]), _targets(test["states"])
    held_out, r2 = {}, {}
    for name, (mean, var) in lat.items():
        held_out[name] = (mean[n:], None if var is None else var[n:])
        r2[name] = {"latent_dim": int(mean.shape[-1]),
                    **_r2(np.asarray(mean[:n]), np.asarray(mean[n:]), y_train, y_test)}  # fmt: skip
    return held_out, r2


def load_data(args) -> tuple[dict, dict]:
    """The training and held-out pendulum sequences of a run's arguments (seeds ``seed`` and
    ``seed + 1``; cached on disk by :func:`pssm.datasets.pendulum_images`)."""
    kw = dict(length=args.length, controls=args.controls)
    return (datasets.pendulum_images(args.sequences, seed=args.seed, **kw),
            datasets.pendulum_images(args.test_sequences, seed=args.seed + 1, **kw))  # fmt: skip


def rescore(folder) -> list[dict]:
    """The R^2 rows of a finished run in ``folder`` recomputed from its saved parameters
    (``<model>_params.npz``) and configuration (``results.json``) with today's latent sets (e.g.
    KalMamba's offsets ``b`` for a run made before they were reported); written to
    ``rescored.json``. Same data, keys and regressions as the run: its rows come back."""
    folder = Path(folder)
    config = json.loads((folder / "results.json").read_text())["config"]
    args = parser().parse_args([])  # the options results.json leaves out (None) at defaults
    vars(args).update(config)
    train, test = load_data(args)
    rows, batch = [], _batch(train)
    for name in args.models:
        entry = MODELS[name](args)
        objective = training.elbo_objective(entry.model, entry.guide, entry.elbo)
        init = lambda k, o=objective: training.init_train_state(o, optax.adam(1e-3), k, batch)
        like = objective.constrain(jax.jit(init)(jax.random.key(args.seed)).params)
        params = load_params(folder / f"{name}_params.npz", like)
        _, r2 = latent_r2(entry, params, _evaluation_keys(args.seed)[0], train, test)
        rows += [{"model": name, "latents": k, **v} for k, v in r2.items()]
    (folder / "rescored.json").write_text(json.dumps({"rows": rows, "config": config}, indent=2))
    return rows


def evaluate_model(name, entry, objective, state, train, test, args, out: Path) -> dict:
    """R^2 per latent set, open-loop MSEs, held-out ELBO, reconstruction MSE, figures and the
    trained parameters (``<name>_params.npz``)."""
    params = objective.constrain(state.params)
    save_params(out / f"{name}_params.npz", params)
    k_lat, k_elbo, k_filt, k_smooth, k_rec = _evaluation_keys(args.seed)
    test_batch = _batch(test)
    lat_test, r2 = latent_r2(entry, params, k_lat, train, test)
    c, T = args.context, args.length
    kw = dict(context=c, num_samples=args.predict_samples)
    filt = prediction_mse(entry, params, k_filt, test_batch, keep=c, **kw)
    smooth = prediction_mse(entry, params, k_smooth, test_batch, keep=1, **kw)
    elbo = evaluation.heldout_elbo(
        objective, state.params, state.aux, k_elbo, test_batch, args.eval_particles
    )
    recon = np.asarray(jax.jit(functools.partial(reconstruct, entry))(params, k_rec, test_batch))
    common = {
        "model": name,
        "test_elbo_per_sequence": elbo["elbo_per_sequence"],
        "test_elbo_se_per_sequence": elbo["elbo_se"] / test_batch["obs"].shape[0],
        "mse_reconstruction": float(np.mean((recon - np.asarray(test_batch["obs"])) ** 2)),
        "mse_filtered": filt.mse,
        "mse_filtered_per_step": filt.per_step.tolist(),
        "mse_smoothed": smooth.mse,
        "mse_smoothed_per_step": smooth.per_step.tolist(),
    }
    if entry.world_model is not None:
        wm = evaluation.world_model_open_loop_mse(
            entry.world_model, params, k_filt, test_batch["obs"], test_batch.get("actions"),
            context=c, num_samples=args.predict_samples,
        )  # fmt: skip
        common["mse_filtered_world_model"] = wm.mse
        common["mse_filtered_world_model_per_step"] = wm.per_step.tolist()
    rows = []
    order = sorted(lat_test, key=lambda k: (lat_test[k][0].shape[-1], k))  # smallest set first
    for latent_name in order:
        rows.append({**common, "latents": latent_name, **r2[latent_name]})
    # figures: the first held-out sequence, the first latent set
    image = (16, 16)
    seq = np.asarray(test_batch["obs"][0]).reshape(T, *image)
    evaluation.save_image_grid(
        out / f"{name}_sequences.png",
        [seq, recon[0].reshape(T, *image), _pad_left(filt.predictions[0].reshape(-1, *image), T),
         _pad_left(smooth.predictions[0].reshape(-1, *image), T)],
        ["truth", "reconstruction", f"predicted (filtered, {c} frames)",
         f"predicted (z_0 | {c} frames)"],
        title=f"{name}: held-out sequence 0",
    )  # fmt: skip
    first = next((k for k in order if lat_test[k][1] is not None), order[0])
    mean, var = (np.asarray(x[0, :, :8]) if x is not None else None for x in lat_test[first])
    evaluation.plot_latent_trajectories(
        out / f"{name}_latents.png", mean, np.zeros_like(mean) if var is None else var,
        truth=np.asarray(test["states"][0]), truth_labels=["angle", "angular velocity"],
        title=f"{name}: posterior means of {first} (+-2 sd; first 8 dimensions)",
    )  # fmt: skip
    for latent_name in order:
        mean_te = lat_test[latent_name][0]
        slug = latent_name.strip("[]").replace(", ", "_")
        flat = np.asarray(mean_te).reshape(-1, mean_te.shape[-1])
        if flat.shape[-1] >= 2:
            angle = test["states"][:, : mean_te.shape[1], 0].ravel()
            evaluation.plot_latent_space(
                out / f"{name}_{slug}_space.png", flat, angle,
                label="angle", title=f"{name}: {latent_name} (held-out frames)",
            )  # fmt: skip
    return rows


def baselines(train, test, args) -> list[dict]:
    """Prediction by the mean training frame and by persistence; R^2 of 8 principal components
    of a single frame (the angle is visible in one frame, the velocity is not)."""
    x_tr = datasets.flatten_images(train["images"]).astype(np.float64)
    x_te = datasets.flatten_images(test["images"]).astype(np.float64)
    c = args.context
    mean_frame = x_tr.reshape(-1, x_tr.shape[-1]).mean(0)
    mse = lambda pred, target: float(np.mean((pred - target) ** 2))
    rows = [
        {"model": "mean frame", "latents": "-", "mse_filtered": mse(mean_frame, x_te[:, c:]),
         "mse_smoothed": mse(mean_frame, x_te[:, 1:])},
        {"model": "persistence", "latents": "-",
         "mse_filtered": mse(x_te[:, c - 1 : c], x_te[:, c:]),
         "mse_smoothed": mse(x_te[:, :1], x_te[:, 1:])},
    ]  # fmt: skip
    k = min(8, x_tr.shape[-1])
    centred = x_tr.reshape(-1, x_tr.shape[-1]) - mean_frame
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    project = lambda x: (x - mean_frame) @ vt[:k].T
    r2 = _r2(project(x_tr), project(x_te), _targets(train["states"]), _targets(test["states"]))
    rows.append({"model": f"frame PCA-{k}", "latents": "pixels", "latent_dim": k, **r2})
    return rows


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def markdown(rows: list[dict], args, notes=()) -> str:
    lines = [
        f"Pendulum 16x16, {args.sequences} training / {args.test_sequences} held-out sequences "
        f"of {args.length} frames, {args.steps} steps.",
        "",
        "| model | latents | dim | R2 angle | R2 velocity | R2 angle (in-sample) | "
        "R2 velocity (in-sample) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "r2_angle" in r:
            lines.append(
                f"| {r['model']} | {r['latents']} | {r.get('latent_dim', '-')} | "
                f"{_fmt(r['r2_angle'])} | {_fmt(r['r2_velocity'])} | "
                f"{_fmt(r['r2_angle_in_sample'])} | {_fmt(r['r2_velocity_in_sample'])} |"
            )
    c = args.context
    lines += [
        "",
        f"| model | test ELBO / seq | MSE recon | MSE predict (filtered, {c} frames) | "
        f"MSE predict (z_0 given {c} frames) | MSE predict (filtered, world model) | "
        "train s (updates) |",
        "|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for r in rows:
        if r["model"] in seen or "mse_filtered" not in r:
            continue
        seen.add(r["model"])
        updates = f" ({r['train_steps']})" if "train_steps" in r else ""
        lines.append(
            f"| {r['model']} | {_fmt(r.get('test_elbo_per_sequence'), '.1f')} | "
            f"{_fmt(r.get('mse_reconstruction'), '.2e')} | {_fmt(r['mse_filtered'], '.2e')} | "
            f"{_fmt(r['mse_smoothed'], '.2e')} | "
            f"{_fmt(r.get('mse_filtered_world_model'), '.2e')} | "
            f"{_fmt(r.get('train_seconds'), '.0f')}{updates} |"
        )
    lines += [
        "",
        "R2: OLS with intercept from latent means, fitted on the training sequences and scored "
        "on the held-out ones; angle = mean R2 of sin and cos. MSE per pixel on held-out "
        f"sequences: filtered = frames {c}..{args.length - 1} from the guide's path over frames "
        f"0..{c - 1}; z_0 = frames 1..{args.length - 1} from z_0 inferred from frames 0..{c - 1}.",
        *("\n" + n for n in notes),
    ]
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.action_dim = 1 if args.controls else 0
    train, test = load_data(args)
    train_batch = _batch(train)
    rows, notes = [], []
    for name in args.models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; registered: {sorted(MODELS)}")
        entry = MODELS[name](args)
        if entry.note:
            notes.append(entry.note)
        objective = training.elbo_objective(entry.model, entry.guide, entry.elbo)
        start = time.perf_counter()
        state, history = training.fit(
            objective, train_batch, optax.adam(args.lr), num_steps=args.steps,
            batch_size=min(args.batch_size, args.sequences), key=jax.random.key(args.seed),
            steps_per_call=min(100, args.steps), progress=args.progress,
            callback=_time_limit(start, args.max_train_minutes),
        )  # fmt: skip
        seconds = time.perf_counter() - start
        if len(history) < args.steps:
            print(f"{name}: stopped at the time limit after {len(history)} of {args.steps} updates")
        tail = history[-max(1, len(history) // 10) :]
        train_elbo = float(np.mean([h["elbo"] for h in tail])) / min(
            args.batch_size, args.sequences
        )
        for row in evaluate_model(name, entry, objective, state, train, test, args, out):
            rows.append({**row, "train_seconds": seconds, "train_elbo_per_sequence": train_elbo,
                         "train_steps": len(history)})  # fmt: skip
        print(f"{name}: trained in {seconds:.0f} s")
    rows += baselines(train, test, args)
    table = markdown(rows, args, notes)
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list))}
    result = {"rows": rows, "config": config,
              "data": train["metadata"], "registered_models": sorted(MODELS)}  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(table)
    print(table)
    print(f"results and figures under {out}")
    return result


def _time_limit(start: float, minutes: float | None):
    """A :func:`inference.training.fit` callback that stops training once ``minutes`` of wall
    time have passed since ``start`` (``None``: no limit)."""
    if minutes is None:
        return None
    return lambda state, records: time.perf_counter() - start > 60.0 * minutes


QUICK = dict(sequences=24, test_sequences=12, length=8, steps=20, batch_size=12, latent=3,
             deter=8, hidden=16, eval_particles=2, context=3)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--models", type=lambda s: [m for m in s.split(",") if m],
        default=["locally_linear", "rssm"],
        help=f"comma-separated, from {sorted(MODELS)}")  # fmt: skip
    add("--steps", type=int, default=3000, help="training updates per model")
    add("--batch-size", type=int, default=50)
    add("--lr", type=float, default=1e-3)
    add("--sequences", type=int, default=500, help="training sequences (EKVAE: 500)")
    add("--test-sequences", type=int, default=200, help="held-out sequences")
    add("--length", type=int, default=15, help="frames per sequence (EKVAE: 15)")
    add("--controls", action="store_true", help="random torques as actions")
    add("--latent", type=int, default=8, help="latent size (RSSM: stochastic part)")
    add("--observed", type=int, default=None,
        help="VRKN, KalMamba: latent coordinates the encoders observe (default: all, H = I; "
             "fewer: RKN's H = [I, 0], the rest a memory)")  # fmt: skip
    add("--parallel", action=argparse.BooleanOptionalAction, default=None,
        help="KalMamba: associative scans (default: on accelerators only; on this CPU the "
             "sequential scans give the same numbers ~1.3x faster per update)")  # fmt: skip
    add("--deter", type=int, default=64, help="RSSM deterministic size")
    add("--hidden", type=int, default=128, help="hidden width of every network")
    add("--free-nats", type=float, default=3.0, help="VRKN's free nats per step (VRKN: 3)")
    add("--alpha", type=float, default=1.0,
        help="KalMamba's weight of the Mahalanobis regulariser between m_t and the filtered "
             "mean (KalMamba: 1)")  # fmt: skip
    add("--obs-var", type=float, default=0.01, help="pixel variance of the Gaussian decoders")
    add("--context", type=int, default=5, help="frames conditioned on before predicting")
    add("--eval-particles", type=int, default=8, help="particles of the held-out ELBO")
    add("--predict-samples", type=int, default=1,
        help="predictions averaged before scoring (1: one sampled future, as EKVAE)")  # fmt: skip
    add("--max-train-minutes", type=float, default=None,
        help="stop each model's training after this many minutes (the updates done are "
             "reported as train_steps)")  # fmt: skip
    add("--seed", type=int, default=0)
    add("--out", default="runs/pendulum_sysid")
    add("--quick", action="store_true", help=f"tiny smoke run: {QUICK}")
    add("--no-progress", dest="progress", action="store_false")


def from_args(args: argparse.Namespace) -> dict:
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if not 1 <= args.context < args.length:
        raise ValueError(f"--context {args.context} must lie in [1, --length {args.length})")
    return run(args)


def parser() -> argparse.ArgumentParser:
    """The example's options (:func:`add_arguments`)."""
    made = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(made)
    return made


def main(argv=None) -> dict:
    parser_ = parser()
    parser_.add_argument("--rescore", metavar="DIR", default=None,
                        help="recompute a finished run's R^2 rows from its saved parameters "
                             "(rescored.json in DIR) instead of training")  # fmt: skip
    args = parser_.parse_args(argv)
    if args.rescore is not None:
        return {"rows": rescore(args.rescore)}
    return from_args(args)


if __name__ == "__main__":
    main()
