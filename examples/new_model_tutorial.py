"""Tutorial: write a new state space model as a plain NumPyro program, train it with every
guide family that applies, then train it as a world model and let an agent act on it.

The system is a damped, driven pendulum ``theta'' = -9.81 sin(theta) - 0.1 theta' + u`` seen
through a noisy sensor of ``(sin theta, cos theta)``. We model it with a *locally-linear latent*
SSM (the skeleton of VRKN, Becker & Neumann 2022):

    encoder        w_t, r_t = enc(o_t)                 latent observation and its variance
    dynamics       A_t, b_t, Q_t = dyn(w_t, a_t)        diagonal, A_t in (0.1, 0.99)
    prior          z_0 ~ N(0, I),  z_{t+1} ~ N(A_t z_t + b_t, Q_t)
    likelihood     o_t ~ N(dec(z_t), 0.05^2 I)
    (to act)       rew_t ~ N(head(z_{t+1}), 1)

Everything a guide needs is the latent LGSSM ``(prior, dynamics, emissions w_t ~ N(z_t, r_t))``:
we return it from a ``structure`` function and declare it with ``pssm.linear_gaussian``.
Then the Kalman-smoothing (VRKN), backward-sampling (VSSF) and amortised filtering (RSSM)
guides all apply, and ``inference.compare`` trains each and prints one table.

Run: ``python -m examples.new_model_tutorial [--steps 400] [--sequences 256]``. What to expect:
the two Kalman guides are the same posterior factorised forwards and backwards, so their ELBOs
agree within Monte Carlo error; on this CPU budget the amortised filter fits fastest, since the
Kalman guides must first learn an encoder whose latent observations the dynamics can explain.

Section 5 ("Act") turns the same model into a world model: a reward head, and a *belief step*
(:mod:`pssm.belief`) made of ``inference.kalman.update`` and ``inference.kalman.predict``, the
Kalman filter of the very structure the guides train on. ``world_model(obs_dims, action_dim)``
is a factory the runner imports, so SAC on the filtered belief trains on dm_control's
pendulum swing-up (3 state dims: orientation cos/sin and velocity; 1 action)::

    python -m examples.new_model_tutorial --act [--env-steps 20000]
    pssm run --agent sac-belief --model examples.new_model_tutorial:world_model \\
        --task pendulum-swingup --variant none --env-steps 20000 --no-video

(``pssm run`` is ``python -m rl``.) The dynamics read the encoder's ``w_t``, which an agent
imagining without observations does not have; see section 5 for how the belief handles it.
"""

import argparse
import json
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from flax import nnx
from numpyro.infer import Trace_ELBO, TraceMeanField_ELBO

from inference import compare, guides, kalman
from inference.training import elbo_objective
from pssm import core, nets
from pssm.rssm import score_rewards

LATENT, OBS, ACTION = 4, 2, 1


def pendulum_ssm(obs_dim=OBS, action_dim=ACTION, *, reward=False, latent=LATENT, seed=0):
    """The model for ``obs_dim`` sensors and ``action_dim`` controls (sections 1-3); with
    ``reward=True`` it also has a reward head and scores ``rewards=`` when given one."""

    # ---- 1. the networks (Flax NNX), created once per model -----------------------------------
    rngs = nnx.Rngs(seed)
    encoder = nets.GaussianMLP(obs_dim, (32,), latent, min_var=1e-3, rngs=rngs)  # o_t -> w_t, r_t
    transition = nets.DiagonalTransition(latent + action_dim, latent, (32,), rngs=rngs)  # A, b, Q
    decoder = nets.MLP(latent, (32,), obs_dim, rngs=rngs)  # z_t -> mean of o_t
    head = nets.MLP(latent, (32,), 1, rngs=rngs) if reward else None  # z_{t+1} -> reward

    # ---- 2. the latent linear-Gaussian structure (shared by model and guides) -----------------
    def structure(obs, actions, mask=None, rewards=None):
        core.check_inputs(obs, actions, mask, obs_dim=obs_dim, action_dim=action_dim)
        w, r = nets.register("encoder", encoder)(obs)  # (B, T, d) each
        A, b, Q = nets.register("transition", transition)(
            jnp.concatenate([w[:, :-1], actions[:, :-1]], -1)
        )
        B, T = obs.shape[:2]
        seen = None if mask is None else jnp.asarray(mask).reshape(B, T) > 0  # runner: (B, T)
        prior = kalman.Gaussian(jnp.zeros((B, latent)), jnp.ones((B, latent)))
        return core.Structure(prior, kalman.Dynamics(A, b, Q), kalman.Emissions(w, r, seen))

    # ---- 3. the model: an ordinary NumPyro program ---------------------------------------------
    @core.linear_gaussian(structure)
    def model(obs, actions, mask=None, rewards=None):
        s = structure(obs, actions, mask)
        z = core.sample_latent_path(*core.model_prior_conditionals(s))  # sites "z_0", "z"
        mean = nets.register("decoder", decoder)(z)
        seen = jnp.ones(obs.shape[:2], bool) if s.emissions.mask is None else s.emissions.mask
        with numpyro.plate("batch", obs.shape[0]):
            numpyro.sample(
                "obs",
                dist.Normal(mean, 0.05).to_event(1).mask(seen).to_event(1),
                obs=jnp.where(seen[..., None], obs, 0.0),
            )
        if rewards is not None:  # the runner's batches carry rewards: rew_t ~ N(head(z_t+1), 1)
            score_rewards(rewards, z, nets.register("reward", head))
        return z

    model.networks = (encoder, transition, decoder, head)
    model.latent, model.action_dim = latent, action_dim
    return model


pendulum_model = pendulum_ssm()  # OBS=2 sensors, ACTION=1: sections 1-4


# ---- 4. data: simulate the pendulum --------------------------------------------------------------
def simulate(n, T, seed=0, dt=0.05):
    rng = np.random.default_rng(seed)
    theta = rng.uniform(-np.pi, np.pi, n)
    omega = rng.normal(0.0, 1.0, n)
    u = rng.normal(0.0, 1.0, (n, T, ACTION))
    states = []
    for t in range(T):
        states.append(np.stack([theta, omega], -1))
        for _ in range(5):  # 5 Euler sub-steps per step
            omega = omega + dt / 5 * (-9.81 * np.sin(theta) - 0.1 * omega + u[:, t, 0])
            theta = theta + dt / 5 * omega
    states = np.stack(states, 1)
    obs = np.stack([np.sin(states[..., 0]), np.cos(states[..., 0])], -1)
    obs = obs + 0.05 * rng.normal(size=obs.shape)
    return {"obs": jnp.asarray(obs), "actions": jnp.asarray(u)}, states


# ---- 5. act: the same model as a world model ----------------------------------------------------
# An agent filters online and imagines ahead one step at a time, so the model offers a *belief
# step* (pssm.belief): init / condition / predict over a belief, plus features and heads. The
# structure above is an LGSSM given the w_t, so its filter is inference.kalman's update (on
# w_t, r_t = enc(o_t)) and predict (through dyn(w_t, a_t)): no Kalman algebra here.
#
# The one design question: the dynamics read the encoder's w_t, and an agent that imagines (or
# misses an observation) has none. The belief therefore carries the last w next to the Gaussian
# over z. condition() stores enc(o_t); predict() uses it and then stores the predicted mean
# E[z_{t+1}] as the stand-in for w_{t+1} (the emission model says E[w | z] = z), which the next
# observation overwrites. So with every step observed the belief is exactly the Kalman filter of
# the trained structure; a masked step or an imagined rollout feeds the dynamics the model's own
# best guess of the missing w. The trained model is unchanged (no train/act mismatch but this
# one stand-in, which training never sees).
class Belief(NamedTuple):
    z: kalman.Gaussian  # filtered N(m, diag P) over z_t, (B, latent) each
    w: jax.Array  # the w_t the next predict() feeds dyn(w_t, a_t): enc(o_t), or a stand-in


def belief_step(model):
    """``model``'s :class:`pssm.core.BeliefStep` (call it under ``substitute(data=params)``)."""
    encoder, transition, decoder, head = model.networks
    enc, dyn = nets.register("encoder", encoder), nets.register("transition", transition)
    dec = nets.register("decoder", decoder)
    rew = None if head is None else nets.register("reward", head)
    d = model.latent

    def init(n):
        return Belief(kalman.Gaussian(jnp.zeros((n, d)), jnp.ones((n, d))), jnp.zeros((n, d)))

    def condition(belief, obs, mask, key):
        w, r = enc(obs)
        seen = jnp.ones(w.shape[0], bool) if mask is None else jnp.reshape(mask, (-1,)) > 0
        z = kalman.update(belief.z, w, r, seen[:, None])[0]
        return Belief(z, jnp.where(seen[:, None], w, belief.w))

    def predict(belief, action, key):
        z = kalman.predict(belief.z, kalman.Dynamics(*dyn(jnp.concatenate([belief.w, action], -1))))
        return Belief(z, z.mean)  # E[z_{t+1}] stands in for w_{t+1} until o_{t+1} arrives

    return core.BeliefStep(init=init, condition=condition, predict=predict,
                           features=lambda b: b.z.mean,
                           reward=None if rew is None else (lambda f: rew(f)[..., 0]),
                           decode=dec)  # fmt: skip


def world_model(obs_dims, action_dim, seed=0):
    """``pssm run --model examples.new_model_tutorial:world_model``: the model, sized from the
    environment, with its reward head and belief step, and its training objective (the Kalman
    smoothing guide, whose filter is the belief step)."""
    if not isinstance(obs_dims, int | np.integer):
        raise ValueError(f"the tutorial's model takes one state vector, got obs_dims={obs_dims}")
    model = pendulum_ssm(int(obs_dims), int(action_dim), reward=True, seed=seed)
    model.belief_step, model.feature_size = (lambda: belief_step(model)), model.latent
    return model, elbo_objective(model, guides.kalman_smoothing(model), TraceMeanField_ELBO())


def act(args):
    """SAC on the filtered belief of the tutorial's world model, on pendulum swing-up."""
    from rl import runner
    from rl.config import RunConfig

    cfg = RunConfig(agent="sac-belief", model="examples.new_model_tutorial:world_model",
                    task="pendulum-swingup", variant=None, env_steps=args.env_steps,
                    seed=args.seed)  # fmt: skip
    run_dir = args.out / f"act-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = runner.run(cfg, run_dir, progress=True, video=False)
    print(f"final eval return {summary['final_eval_return']:.1f} (random policy "
          f"{summary['random_return']:.1f}) after {summary['env_steps']} env steps")  # fmt: skip
    print(f"evaluations (agent step, return): {json.dumps(summary['evals'])}; in {run_dir}")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train a new model with every guide family.")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--length", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("runs/new_model_tutorial"))
    parser.add_argument(
        "--act",
        action="store_true",
        help="section 5: SAC on the world model's belief on pendulum-swingup",
    )
    parser.add_argument("--env-steps", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.act:
        return act(args)

    data, _ = simulate(args.sequences, args.length)
    held_out, _ = simulate(64, args.length, seed=1)
    rows = compare.compare(
        pendulum_model,
        guides={
            "kalman_smoothing": guides.kalman_smoothing,  # VRKN bound (smoothing posterior)
            "backward_sampling": guides.backward_sampling,  # VSSF
            "filtering": guides.filtering,  # RSSM-style amortised filter
        },
        elbos={"mean_field": TraceMeanField_ELBO(), "trace": Trace_ELBO()},
        pairs=[
            ("kalman_smoothing", "mean_field"),
            ("backward_sampling", "trace"),
            ("filtering", "mean_field"),
        ],
        data=data,
        eval_data=held_out,
        num_steps=args.steps,
        batch_size=32,
        optimizer=optax.adam(3e-3),
        key=jax.random.PRNGKey(0),
    )
    print(compare.markdown_table(rows))
    path = compare.save(rows, args.out, name="tutorial")
    print(f"table saved under {path}")
    return rows


if __name__ == "__main__":
    main()
