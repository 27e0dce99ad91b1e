"""A model written only here, in no registry, trains and acts through the runner with every
agent: ``pssm run --model tests.test_user_model:factory``.

The model is the smallest one a user would write to act: a linear-Gaussian latent SSM with an
encoder, a decoder and a reward head, whose belief step is ``inference.kalman``'s predict and
update (Kalman filtering of its own latent LGSSM, the structure the Kalman-smoothing guide
trains on)::

    w_t, r_t = enc(o_t),   z_0 ~ N(0, I),   z_{t+1} ~ N(A z_t + B a_t, diag(q)),
    w_t ~ N(z_t, diag(r_t)),   o_t ~ N(dec(z_t), 0.1^2 I),   rew_t ~ N(head(z_{t+1}), 1)
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from flax import nnx
from numpyro.infer import TraceMeanField_ELBO

from inference import guides, kalman
from inference.training import elbo_objective
from pssm import core, nets
from pssm.rssm import score_rewards
from rl import runner
from rl.config import ConfigError, RunConfig, check
from rl.models import build
from rl.world_model import ModelParts, filter_sequence

D = 3


def user_model(obs_dim: int, action_dim: int, seed: int = 0):
    rngs = nnx.Rngs(seed)
    encoder = nets.GaussianMLP(obs_dim, (16,), D, min_var=1e-3, rngs=rngs)
    decoder = nets.MLP(D, (16,), obs_dim, rngs=rngs)
    head = nets.MLP(D, (16,), 1, rngs=rngs)

    def parameters():
        A = numpyro.param("A", 0.9 * jnp.ones(D))
        B = numpyro.param("B", jnp.zeros((D, action_dim)))
        q = numpyro.param("q", 0.1 * jnp.ones(D), constraint=dist.constraints.positive)
        return A, B, q, nets.register("encoder", encoder), nets.register("decoder", decoder)

    def structure(obs, actions, mask=None, rewards=None):
        A, B, q, enc, _ = parameters()
        w, r = enc(obs)
        n, T = obs.shape[:2]
        b = actions[:, :-1] @ B.T
        dyn = kalman.Dynamics(jnp.broadcast_to(A, b.shape), b, jnp.broadcast_to(q, b.shape))
        prior = kalman.Gaussian(jnp.zeros((n, D)), jnp.ones((n, D)))
        m = jnp.ones((n, T), bool) if mask is None else jnp.asarray(mask).reshape(n, T) > 0
        return core.Structure(prior, dyn, kalman.Emissions(w, r, m))

    @core.linear_gaussian(structure)
    def model(obs, actions, mask=None, rewards=None):
        s = structure(obs, actions, mask)
        z = core.sample_latent_path(*core.model_prior_conditionals(s))
        _, _, _, _, dec = parameters()
        seen = s.emissions.mask
        with numpyro.plate("batch", obs.shape[0]):
            numpyro.sample("obs", dist.Normal(dec(z), 0.1).to_event(1).mask(seen).to_event(1),
                           obs=jnp.where(seen[..., None], obs, 0.0))  # fmt: skip
        if rewards is not None:
            score_rewards(rewards, z, nets.register("reward", head))

    def belief_step():
        A, B, q, enc, dec = parameters()
        reward = nets.register("reward", head)

        def condition(belief, obs, mask, key):
            w, r = enc(obs)
            seen = jnp.ones(w.shape[0], bool) if mask is None else jnp.reshape(mask, (-1,))
            return kalman.update(belief, w, r, seen[:, None])[0]

        def predict(belief, action, key):
            return kalman.predict(belief, kalman.Dynamics(A, action @ B.T, q))

        return core.BeliefStep(
            init=lambda n: kalman.Gaussian(jnp.zeros((n, D)), jnp.ones((n, D))),
            condition=condition, predict=predict, features=lambda b: b.mean,
            reward=lambda f: reward(f)[..., 0], decode=dec,
        )  # fmt: skip

    model.belief_step, model.feature_size, model.action_dim = belief_step, D, action_dim
    return model


def factory(obs_dims, action_dim, seed=0):
    """What ``--model tests.test_user_model:factory`` calls: the model and its objective."""
    model = user_model(int(obs_dims), action_dim, seed)
    return model, elbo_objective(model, guides.kalman_smoothing(model), TraceMeanField_ELBO())


def parts_factory(obs_dims, action_dim, seed=0):
    """The same model as its parts: the runner trains it as it trains the registry's models."""
    model = user_model(int(obs_dims), action_dim, seed)
    return ModelParts(model, guides.kalman_smoothing(model), TraceMeanField_ELBO())


def test_a_factory_returning_parts_gets_the_run_settings():
    """``reconstruction=false`` reaches a user's model given as parts: the observation term
    leaves the loss (the decoder gets no gradient, the full model's does); a factory that
    returns its own objective cannot honour it and is refused."""
    rng = np.random.default_rng(0)
    batch = {"obs": jnp.asarray(rng.normal(size=(2, 5, 2)), jnp.float32),
             "actions": jnp.asarray(rng.normal(size=(2, 5, 1)), jnp.float32),
             "rewards": jnp.asarray(rng.normal(size=(2, 5)), jnp.float32),
             "mask": jnp.ones((2, 5), bool)}  # fmt: skip
    path = "tests.test_user_model:parts_factory"
    full, reward_only = build(path, 2, 1, {}), build(path, 2, 1, {"reconstruction": False})
    key = jax.random.key(0)
    params, aux = full.objective.init(key, batch)
    jax.eval_shape(reward_only.objective.init, key, batch)  # readies its constrain

    def grads(wm):
        return jax.grad(lambda p: wm.objective.loss(p, aux, key, batch)[0])(params)

    g_full, g_ro = grads(full), grads(reward_only)
    decoder = [k for k in params if "decoder" in k]
    assert decoder
    assert all(any(jnp.any(x != 0) for x in jax.tree.leaves(g_full[k])) for k in decoder)
    assert not any(jnp.any(x != 0) for k in decoder for x in jax.tree.leaves(g_ro[k]))
    with pytest.raises(ValueError, match="reconstruction=false"):
        build("tests.test_user_model:factory", 2, 1, {"reconstruction": False})


def test_the_belief_step_filters_as_the_kalman_guide_does():
    """Stepping condition/predict over a sequence gives the Kalman filter of the model's own
    latent LGSSM (the structure the guide smooths), float64."""
    wm = build("tests.test_user_model:factory", 2, 1, {}, seed=0)
    assert wm.filter_sequence is None  # no whole-sequence filter: the generic scan steps it
    rng = np.random.default_rng(0)
    obs, actions = jnp.asarray(rng.normal(size=(2, 6, 2))), jnp.asarray(rng.normal(size=(2, 6, 1)))
    mask = jnp.asarray(rng.uniform(size=(2, 6)) > 0.3)
    batch = {"obs": obs, "actions": actions, "mask": mask, "rewards": jnp.zeros((2, 6))}
    train, _ = wm.objective.init(jax.random.key(0), batch)
    params = wm.objective.constrain(jax.tree.map(lambda v: v + 0.05, train))  # not the init
    stepped = filter_sequence(wm, params, jax.random.key(1), obs, actions, mask)
    model = user_model(2, 1)
    with numpyro.handlers.substitute(data=params):
        s = model.structure(obs, actions, mask)
    ref = jax.vmap(kalman.filter)(*s).filtered
    np.testing.assert_allclose(stepped.mean, ref.mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stepped.cov, ref.cov, rtol=1e-10, atol=1e-12)


def test_a_bad_factory_path_is_a_config_error():
    for path, match in (("tests.no_such_module:factory", "cannot import"),
                        ("tests.test_user_model:nope", "no attribute")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            check(RunConfig(model=path))


TINY = (("hidden", 16), ("batch_size", 16), ("model_batch", 4), ("seq_len", 8),
        ("start_batch", 2), ("dreamer.actor_hidden", 16), ("dreamer.critic_hidden", 16),
        ("dreamer.horizon", 4), ("planet.candidates", 16), ("planet.iterations", 2),
        ("planet.top_k", 4), ("planet.horizon", 3))  # fmt: skip


@pytest.mark.parametrize("agent", ["sac-belief", "dreamer", "planet"])
def test_a_model_from_a_test_file_trains_and_acts_with_every_agent(tmp_path, agent):
    cfg = RunConfig(agent=agent, model="tests.test_user_model:factory", env_steps=600,
                    prefill_steps=100, train_every=50, updates=2, eval_every=10**9,
                    eval_episodes=1, checkpoint_every=10**9, overrides=TINY)  # fmt: skip
    summary = runner.run(cfg, tmp_path, progress=False, video=False, compilation_cache=False)
    assert summary["model"] == "tests.test_user_model:factory"
    assert np.isfinite(summary["final_eval_return"])
    train = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if "model_loss" in r]
    assert train and all(np.isfinite(r["model_loss"]) for r in train)


def test_a_model_without_a_belief_step_is_told_what_it_lacks():
    from rl.world_model import belief_world_model

    model, objective = factory(2, 1)
    del model.belief_step
    with pytest.raises(TypeError, match="belief_step.*ActingModel"):
        belief_world_model(model, objective)
