"""Shared pieces of the EKVAE reproductions (Klushyn et al. 2021, "Latent Matters", Sec. 6):
:mod:`examples.ekvae_pendulum` (Table 1a) and :mod:`examples.ekvae_reacher` (Table 1b).

* :data:`VARIANTS` and :func:`objective_for`: EKVAE with or without the VHP, trained under CO
  (:class:`inference.objectives.ConstrainedELBO`, REWO, D0 calibrated after an
  encoder/decoder-only phase) or KL annealing (:class:`inference.objectives.AnnealedELBO`,
  ``beta`` linear 0 -> 1 over the first half of training).
* :func:`train`: jitted initialisation and :func:`inference.training.fit`.
* :func:`smoothed_start_prediction`: the paper's prediction protocol (Table 1): ``z_0 ~
  q(z_0 | x_{0:c-1}, u_{0:c-2})``, the smoothed posterior of the *first* step given a context
  of ``c`` steps (the paper: ``c = 5``), rolled forward through the learned transition with
  the recorded controls and decoded, for the whole sequence; MSE against the observations
  (:func:`inference.evaluation.open_loop_mse`).
* :func:`parse_config`: the command line shared by both examples.
"""

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
from numpyro import handlers

from inference import training
from inference.evaluation import OpenLoopResult, heldout_elbo, open_loop_mse
from inference.objectives import AnnealedELBO, ConstrainedELBO, EKVAEBound
from pssm.ekvae import infer_latents
from pssm.extended_kalman import apply_transition

VARIANTS = {  # name: (label, method, vhp)
    "annealing": ("EKVAE (annealing)", "annealing", False),
    "co": ("EKVAE (CO)", "co", False),
    "annealing-vhp": ("VHP-EKVAE (annealing)", "annealing", True),
    "co-vhp": ("VHP-EKVAE (CO)", "co", True),
}

#: The CO objective's options and their defaults: entries ``--set`` may add beside a
#: configuration's own.
CO_OPTIONS = {"calibration_rate_weight": 1.0, "lambda_after": None, "slack": 0.05, "nu": 0.1}


def objective_for(method: str, cfg: dict, model, guide):
    """The EKVAE bound under CO (``method="co"``) or annealing, as a training objective."""
    inner = EKVAEBound()
    if method == "co":
        o = {k: cfg.get(k, v) for k, v in CO_OPTIONS.items()}
        elbo = ConstrainedELBO(inner, calibration_steps=cfg["calibration"],
                               calibration_rate_weight=o["calibration_rate_weight"],
                               lambda_after_calibration=o["lambda_after"],
                               slack=o["slack"], nu=o["nu"])  # fmt: skip
    else:
        elbo = AnnealedELBO(inner, warmup_steps=cfg["steps"] // 2)
    return training.elbo_objective(model, guide, elbo)


def initial_state(objective, data: dict, cfg: dict, seed: int, optimizer):
    """The :class:`inference.training.TrainState` of ``objective`` before any update, from
    ``jax.random.key(seed)`` and the first ``cfg["batch"]`` sequences (jitted: the eager
    initialisation would run the Kalman smoother op by op)."""
    init_batch = {k: v[: cfg["batch"]] for k, v in data.items()}
    init = lambda k: training.init_train_state(objective, optimizer, k, init_batch)
    return jax.jit(init)(jax.random.key(seed))


def train(
    objective,
    data: dict,
    cfg: dict,
    seed: int,
    *,
    num_steps: int | None = None,
    resume: tuple | None = None,
    optimizer=None,
):
    """Adam(``cfg["lr"]``) for ``num_steps`` (default ``cfg["steps"]``) updates in all, batch
    ``cfg["batch"]``; returns ``(state, history, seconds)``. ``resume``: the ``(state,
    history, seconds)`` of an earlier call on the same objective, continued to ``num_steps``
    (pass that call's ``optimizer`` too, or the update is compiled again)."""
    num_steps = cfg["steps"] if num_steps is None else num_steps
    optimizer = optax.adam(cfg["lr"]) if optimizer is None else optimizer
    start = time.time()
    if resume is None:
        state, history, spent = initial_state(objective, data, cfg, seed, optimizer), [], 0.0
    else:
        state, history, spent = resume
    state, new = training.fit(
        objective, data, optimizer, num_steps=num_steps, batch_size=cfg["batch"],
        state=state, steps_per_call=min(250, num_steps), progress=False,
    )  # fmt: skip
    return state, history + new, spent + time.time() - start


def train_selected(make, data: dict, validation: dict, cfg: dict, seed: int):
    """Best of ``cfg["restarts"]`` initialisations, chosen by the bound on held-out data.

    Candidate ``k`` (``make(seed + 1000 k) -> (objective, model, guide)``, networks initialised
    from that seed; candidate 0 is the plain run of ``seed``) trains ``cfg["screen_steps"]``
    updates; the one whose bound per sequence on ``validation`` (a batch of model arguments,
    *not* the test set; no ground truth is used) is highest continues to ``cfg["steps"]``; the
    others are dropped. Why: on the pendulum the bound early in training ranks initialisations
    the way the latent space's quality does (a circle of ``a`` broken open, or a velocity
    coordinate that changes sign along it, scores visibly lower), and a bad start does not
    recover with more training. With one restart this is :func:`train`.

    Returns ``(objective, model, guide, state, history, seconds, screening)``: ``screening``
    lists the candidates' ``{"seed", "validation_bound", "selected"}`` (empty for one restart),
    ``seconds`` counts every candidate's training. The objective, model and guide returned are
    candidate 0's (the candidates share them, and one compiled update, since they differ in
    their initial parameter values only; a ``make`` whose parameters' names or shapes depend on
    the seed raises ``ValueError``).
    """
    restarts, screen_steps = int(cfg.get("restarts", 1)), int(cfg.get("screen_steps", 0))
    training.check_screening(restarts, screen_steps, cfg["steps"])
    if restarts == 1:
        objective, model, guide = make(seed)
        return (objective, model, guide, *train(objective, data, cfg, seed), [])
    # Every candidate trains with candidate 0's objective and optimizer, so that the update
    # compiles once: the candidates differ only in their initial parameters (checked below).
    objective, model, guide = make(seed)
    optimizer = optax.adam(cfg["lr"])
    seeds, starts, start = training.restart_seeds(seed, restarts), {}, time.time()
    for s in seeds:
        starts[s] = initial_state(make(s)[0] if s != seed else objective, data, cfg, s, optimizer)
        training.check_same_structure(starts[seed], starts[s], f"make({s})")
    init_seconds = (time.time() - start) / restarts

    spent = []  # every candidate's training time counts

    def screen(s):
        run = train(objective, data, cfg, s, num_steps=screen_steps, optimizer=optimizer,
                    resume=(starts[s], [], init_seconds))  # fmt: skip
        spent.append(run[2])
        return run

    def bound(run):
        return heldout_elbo(objective, run[0].params, run[0].aux, jax.random.key(seed + 5),
                            validation, num_particles=4)["elbo_per_sequence"]  # fmt: skip

    best, (state, history, _), screening = training.best_start(seeds, screen, bound)
    state, history, seconds = train(objective, data, cfg, seeds[best], optimizer=optimizer,
                                    resume=(state, history, sum(spent)))  # fmt: skip
    return objective, model, guide, state, history, seconds, screening


# ---- prediction ------------------------------------------------------------------------------


def decode_means(model, params: dict, a: jax.Array) -> jax.Array:
    """Mean of ``p(x_t | a_t)`` ``(B, T, p)`` at auxiliary values ``a`` ``(B, T, D_a)``, read
    off the model's ``"obs"`` site with ``"a"`` substituted (either likelihood)."""
    B, T = a.shape[:2]
    obs = jnp.zeros((B, T, model.obs_dim), a.dtype)
    actions = jnp.zeros((B, T, model.action_dim), a.dtype) if model.action_dim else None
    m = handlers.substitute(handlers.substitute(model, data=params), data={"a": a})
    tr = handlers.trace(handlers.seed(m, 0)).get_trace(obs, actions)
    return tr["obs"]["fn"].mean


def rollout(model, params: dict, key, z0: jax.Array, actions, num_steps: int, *, sample=True):
    """Latent path ``(B, num_steps, d)`` from ``z_0`` ``(B, d)``: ``z_{t+1} ~ N(F z_t + B u_t,
    Q)`` with ``[F, B, Q]`` the learned linearisation at ``(z_t, u_t)`` (Eq. 9), ``u_t =
    actions[:, t]``; ``sample=False`` follows the transition means."""
    with handlers.block(), handlers.substitute(data=params):
        _, _, _, transition = model.parameters()
    u = None if actions is None else jnp.moveaxis(actions[:, : num_steps - 1], 1, 0)
    keys = jax.random.split(key, num_steps - 1)

    def step(z, xs):
        k, u_t = xs
        _, _, mean, Q = apply_transition(transition, z, u_t)
        z = dist.MultivariateNormal(mean, Q).sample(k) if sample else mean
        return z, z

    _, zs = jax.lax.scan(step, z0, (keys, u), length=num_steps - 1)
    return jnp.concatenate([z0[:, None], jnp.moveaxis(zs, 0, 1)], axis=1)


def smoothed_start_prediction(
    model, guide, params: dict, key, obs, actions=None, *, context: int = 5, sample: bool = True
) -> OpenLoopResult:
    """EKVAE Table 1 prediction MSE: ``z_0`` drawn from the smoothed ``q(z_0 | x_{0:c-1},
    u_{0:c-2})`` (:func:`pssm.ekvae.infer_latents` on the first ``context`` steps; ``sample=False``:
    its mean), rolled forward over all ``T`` steps (:func:`rollout`) and decoded at ``a_t = H
    z_t`` (:func:`decode_means`); scored against ``obs`` ``(B, T, p)`` at every step (the
    first too: only ``z_0`` is kept from the context). ``params``: constrained parameters."""
    (result,) = _smoothed_start_predictions(model, guide, params, key, obs, actions, context,
                                            (sample,))  # fmt: skip
    return result


def _smoothed_start_predictions(model, guide, params, key, obs, actions, context, modes):
    """:func:`smoothed_start_prediction` for each ``sample`` in ``modes``, from one smoothing of
    the context."""
    obs = jnp.asarray(obs)
    B, T = obs.shape[:2]
    if not 1 <= context <= T:
        raise ValueError(f"context={context} must lie in [1, T={T}]")

    @jax.jit
    def start(params, obs, actions):
        ctx_actions = None if actions is None else actions[:, :context]
        post = infer_latents(model, guide, params, obs[:, :context], ctx_actions)
        return post.mean[:, 0], post.cov[:, 0]

    def predictor(sample):
        @jax.jit
        def predict(params, key, belief, actions):
            mean, cov = belief
            k_start, k_path = jax.random.split(key)
            z0 = dist.MultivariateNormal(mean, cov).sample(k_start) if sample else mean
            z = rollout(model, params, k_path, z0, actions, T, sample=sample)
            with handlers.block(), handlers.substitute(data=params):
                H, *_ = model.parameters()
            return decode_means(model, params, jnp.einsum("ij,btj->bti", H, z))

        return predict

    belief = start(params, obs, actions)
    return [open_loop_mse(predictor(m), params, key, belief, actions, obs) for m in modes]


def predictions(model, guide, params: dict, key, obs, actions=None, *, context: int = 5):
    """:func:`smoothed_start_prediction` twice, from one smoothing of the context: sampled
    (``z_0`` drawn from its smoothed posterior, transition noise drawn at every step: Table 1's
    protocol read literally) and along the means (``z_0`` the smoothed mean, the transition
    means: the model's best single guess, free of its noise). Returns the sampled
    :class:`OpenLoopResult` and the row entries ``prediction_mse``, ``prediction_mse_per_step``
    and ``prediction_mse_mean_path``."""
    sampled, mean = _smoothed_start_predictions(model, guide, params, key, obs, actions, context,
                                                (True, False))  # fmt: skip
    return sampled, {
        "prediction_mse": sampled.mse,
        "prediction_mse_per_step": [float(x) for x in sampled.per_step],
        "prediction_mse_mean_path": mean.mse,
    }


def training_summary(history: list[dict], seconds: float, cfg: dict) -> dict:
    """The end of a training run for a results row: the mean training bound of the last 100
    updates, the final distortion, rate, multiplier (CO) or beta (annealing) and D0."""
    last = history[-1]
    return {
        "train_elbo_last100": float(np.mean([h["elbo"] for h in history[-100:]])),
        "final_distortion": float(last["distortion"]),
        "final_rate": float(last["rate"]),
        "lambda_or_beta": float(last.get("lagrange_multiplier", last.get("beta", np.nan))),
        "d0": float(last["d0"]) if "d0" in last else None,
        "train_seconds": seconds,
        "steps": cfg["steps"],
    }


# ---- command line ----------------------------------------------------------------------------


def parse_config(argv, description: str, configs: dict, default_out: str, image_configs=None):
    """``--quick``, ``--steps``, ``--variants``, ``--seed``, ``--set KEY=JSON``, ``--out``, and
    ``--images`` (the configurations ``image_configs`` instead of ``configs``) when
    ``image_configs`` is given; returns ``(cfg, variant keys, out directory, args)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test configuration")
    if image_configs is not None:
        parser.add_argument("--images", action="store_true", help="learn from rendered images")
    parser.add_argument("--steps", type=int, default=None, help="updates per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, among {', '.join(VARIANTS)}")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a configuration entry (e.g. slack=0.1, nu=0.05)",
    )
    parser.add_argument("--out", default=default_out)
    args = parser.parse_args(argv)
    if getattr(args, "images", False):
        configs = image_configs
    cfg = dict(configs["quick" if args.quick else "full"])
    if args.steps is not None:
        cfg["steps"] = args.steps
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in cfg and name not in CO_OPTIONS:
            known = ", ".join(sorted([*cfg, *CO_OPTIONS]))
            parser.error(f"--set {name}: unknown entry (known: {known})")
        try:
            cfg[name] = json.loads(value)
        except json.JSONDecodeError:
            cfg[name] = value
    keys = [k for k in args.variants.split(",") if k]
    unknown = set(keys) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose among {list(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return cfg, keys, out, args
