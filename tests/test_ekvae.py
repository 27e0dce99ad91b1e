"""EKVAE (Klushyn et al. 2021): neural linearisation, extended Kalman filter/smoother, the bound
of Eqs. 16-18 and the VHP, against independent references (the textbook Kalman filter of
pssm.lgssm, a NumPy EKF loop, brute-force conditioning of the joint Gaussian)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from numpyro import handlers

from inference import kalman, objectives, training
from inference.guides import ekvae_guide
from inference.objectives import EKVAEBound, vhp_bound
from pssm.ekvae import NeuralLinearisation, ekvae, infer_latents
from pssm.extended_kalman import auxiliary_bound, extended_kalman_filter, extended_kalman_smoother
from pssm.lgssm import lgssm
from pssm.vhp import VHP
from tests.kalman_reference import DenseModel, condition

D, PA, U, T = 3, 2, 1, 6
# XLA's backend optimisations roughly double the compile time of these small, linear-algebra
# heavy graphs, and compiling is what these tests spend their time on.
FAST = {"xla_backend_optimization_level": 0}


def quick(fn):
    """``jax.jit(fn)``, compiled at the first call with :data:`FAST` (same shapes after)."""
    compiled = {}

    def call(*args):
        if "fn" not in compiled:
            compiled["fn"] = jax.jit(fn).lower(*args).compile(compiler_options=FAST)
        return compiled["fn"](*args)

    return call


A = np.array([[0.95, 0.1, 0.0], [-0.1, 0.9, 0.05], [0.0, 0.2, 0.8]])
Bm = np.array([[0.3], [0.0], [-0.2]])
Q = np.array([[0.05, 0.01, 0.0], [0.01, 0.04, 0.0], [0.0, 0.0, 0.03]])
Hm = np.array([[1.0, 0.0, 0.2], [0.0, 1.0, -0.3]])
R = np.array([[0.1, 0.02], [0.02, 0.08]])
M0, P0 = np.array([0.2, -0.1, 0.3]), np.diag([0.5, 0.4, 0.6])


def linear_transition(seed=0):
    """M = 1: F, B, Q constant (g is irrelevant: softmax of one logit is 1)."""
    return NeuralLinearisation(
        D, U, 1, (4,), F_init=A, B_init=Bm, Q_init=Q, q_min=1e-6, rngs=nnx.Rngs(seed)
    )


def _data(seed, n=4):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, T, PA))
    u = rng.normal(size=(n, T, U))
    mask = rng.random((n, T)) > 0.25
    mask[:, 0] = True
    mask[0, 1] = False  # a_1 missing: the t = 1 term drops out
    return jnp.asarray(a), jnp.asarray(u), jnp.asarray(mask)


def test_linear_ekf_and_smoother_equal_the_lgssm_kalman_results():
    """M = 1 reduces the EKVAE's latent model to the LGSSM: EKF == Kalman filter, EKS == RTS
    smoother of pssm.lgssm's structure (with actions and missing steps)."""
    a, u, mask = _data(0)
    net = linear_transition()
    prior = kalman.Gaussian(jnp.asarray(M0), jnp.asarray(P0))

    @quick
    def run(a, u, mask):
        def one(a_, u_, m_):
            ekf = extended_kalman_filter(net, prior, jnp.asarray(Hm), jnp.asarray(R), a_, u_, m_)
            return ekf, extended_kalman_smoother(ekf)

        ekf, smoothed = jax.vmap(one)(a, u, mask)
        s = lgssm(A, Q, Hm, R, m0=M0, P0=P0, B=Bm).structure(a, u, mask)
        return ekf, smoothed, jax.vmap(kalman.smoother)(*s)

    ekf, smoothed, ref = run(a, u, mask)
    close = lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-11)
    close(ekf.filtered.mean, ref.filtered.filtered.mean)
    close(ekf.filtered.cov, ref.filtered.filtered.cov)
    close(ekf.predicted.mean, ref.filtered.predicted.mean)
    close(ekf.log_likelihoods, ref.filtered.log_likelihoods)
    close(smoothed.mean, ref.smoothed.mean)
    close(smoothed.cov, ref.smoothed.cov)
    np.testing.assert_allclose(ekf.dynamics.A, np.broadcast_to(A, (4, T - 1, D, D)), rtol=1e-12)
    np.testing.assert_allclose(ekf.dynamics.Q[0, 0], Q, rtol=1e-10)  # via its Cholesky factor
    np.testing.assert_allclose(ekf.dynamics.b, np.asarray(u[:, :-1]) @ Bm.T, rtol=1e-12)


def _numpy_ekf(net, a, u, mask):
    """The EKF as a plain loop: linearise at the filtered mean, predict, update."""
    m, P = M0.copy(), P0.copy()
    out = []
    for t in range(T):
        if mask[t]:
            S = Hm @ P @ Hm.T + R
            K = P @ Hm.T @ np.linalg.inv(S)
            m, P = m + K @ (a[t] - Hm @ m), (np.eye(D) - K @ Hm) @ P
        out.append((m, P))
        F, B, Qt = (np.asarray(x) for x in net(jnp.asarray(m), jnp.asarray(u[t])))
        m, P = F @ m + B @ u[t], F @ P @ F.T + Qt
    return out


def test_nonlinear_ekf_matches_a_numpy_loop_and_its_smoother_is_the_kalman_smoother():
    """M = 3: the linearisation is a softmax mixture of positive definite bases; the EKF equals
    a NumPy loop calling it; the RTS smoother of the linearised LGSSM (inference.kalman) equals
    the extended smoother."""
    a, u, mask = _data(1, n=2)
    net = NeuralLinearisation(D, U, 3, (8,), init_noise=0.3, rngs=nnx.Rngs(5))
    prior = kalman.Gaussian(jnp.asarray(M0), jnp.asarray(P0))
    H_, R_ = jnp.asarray(Hm), jnp.asarray(R)

    @quick
    def run(a, u, mask):
        ekf = extended_kalman_filter(net, prior, H_, R_, a, u, mask)
        post = kalman.smoother(prior, ekf.dynamics, kalman.Emissions(a, R_, mask, H_))
        mix = (net(a[:, :1].repeat(D, -1)[:, :D], u), net.weights(a[:, :1].repeat(D, -1), u))
        return ekf, post, extended_kalman_smoother(ekf), mix, net.bases()

    step = quick(lambda m, u: net(m, u))
    for n in range(2):
        ekf, post, sm, ((F, B, Qz), alpha), bases = run(a[n], u[n], mask[n])
        ref = _numpy_ekf(step, np.asarray(a[n]), np.asarray(u[n]), np.asarray(mask[n]))
        np.testing.assert_allclose(ekf.filtered.mean, [m for m, _ in ref], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(ekf.filtered.cov, [P for _, P in ref], rtol=1e-9, atol=1e-12)
        # the dynamics are state dependent: not one matrix for all steps
        assert np.abs(np.diff(np.asarray(ekf.dynamics.A), axis=0)).max() > 1e-3
        np.testing.assert_allclose(post.filtered.filtered.mean, ekf.filtered.mean, rtol=1e-9)
        np.testing.assert_allclose(sm.mean, post.smoothed.mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(sm.cov, post.smoothed.cov, rtol=1e-9, atol=1e-12)
    # (F, B, Q)(z, u) = sum_m alpha_m (F, B, Q)^(m), alpha = softmax(g(z, u)), Q^(m) > 0
    alpha = np.asarray(alpha)
    np.testing.assert_allclose(alpha.sum(-1), 1.0, rtol=1e-12)
    assert np.ptp(alpha, axis=0).max() > 1e-3
    for X, base in zip((F, B, Qz), bases, strict=True):
        np.testing.assert_allclose(X, np.einsum("tm,mij->tij", alpha, base), rtol=1e-10)
    assert np.linalg.eigvalsh(np.asarray(bases[2])).min() > 0
    with pytest.raises(ValueError, match="takes actions"):
        net(jnp.zeros(D))


def _gauss_kl(m1, P1, m2, P2):
    d = len(m1)
    iP2 = np.linalg.inv(P2)
    r = m2 - m1
    return 0.5 * (
        np.trace(iP2 @ P1) + r @ iP2 @ r - d + np.linalg.slogdet(P2)[1] - np.linalg.slogdet(P1)[1]
    )


def _reference_bound(a, u, mask, posterior):
    """``log p(a) - sum of Jensen gaps`` by brute-force conditioning (module docstring of
    pssm.ekvae): gap ``KL(q_{t-1} || p(z_{t-1} | a_{0:t}))`` per observed ``t >= 1`` and
    ``KL(q_0 || p(z_0 | a_0))`` for the initial term."""
    steps = [(a[t], Hm, R) if mask[t] else (np.zeros(0), np.zeros((0, D)), np.zeros((0, 0)))
             for t in range(T)]  # fmt: skip
    b = u[:-1] @ Bm.T
    model = DenseModel(M0, P0, np.broadcast_to(A, (T - 1, D, D)), b,
                       np.broadcast_to(Q, (T - 1, D, D)), steps)  # fmt: skip
    observed = [t for t in range(T) if mask[t]]

    def marginal(last, t):
        """``p(z_t | a_s for observed s <= last)``."""
        mean, cov, _ = condition(model, [s for s in observed if s <= last], max(last, t) + 1)
        return mean[t * D : (t + 1) * D], cov[t * D : (t + 1) * D, t * D : (t + 1) * D]

    path_mean, _, log_p = condition(model, observed)
    gaps = 0.0
    for t in observed:
        s = max(t - 1, 0)
        target = marginal(t, s)  # p(z_{t-1} | a_{0:t}), or p(z_0 | a_0) at t = 0
        q = marginal(T - 1, s) if posterior == "smoother" else marginal(s, s)
        gaps += _gauss_kl(*q, *target)
    return log_p, log_p - gaps, path_mean


@pytest.mark.parametrize(
    "posterior, analytic",
    [("smoother", True), pytest.param("smoother", False, marks=pytest.mark.slow), ("filter", True)],
)
def test_linear_bound_equals_log_evidence_minus_the_jensen_gaps(posterior, analytic):
    """For M = 1 the rate's z-expectation is exact (Eqs. 16-18): ``E_z L(a) = log p(a) -
    sum_t KL(q_{t-1} || p(z_{t-1} | a_{0:t}))``; Monte Carlo over z within 5 standard errors."""
    a, u, mask = _data(2, n=1)
    net = linear_transition()
    prior = kalman.Gaussian(jnp.asarray(M0), jnp.asarray(P0))
    K = 2000

    @quick
    def estimates(keys):
        one = lambda k: auxiliary_bound(
            k,
            net,
            prior,
            jnp.asarray(Hm),
            jnp.asarray(R),
            a[0],
            u[0],
            mask[0],
            posterior=posterior,
            analytic=analytic,
        )
        return jax.vmap(one)(keys)["bound"]  # fmt: skip

    values = np.asarray(estimates(jax.random.split(jax.random.key(0), K)))
    log_p, expected, _ = _reference_bound(*(np.asarray(x[0]) for x in (a, u, mask)), posterior)
    se = values.std(ddof=1) / np.sqrt(K)
    assert abs(values.mean() - expected) < 5 * se + 1e-9
    assert expected < log_p - 1e-3  # a real gap: the bound is not log p(a) itself
    assert log_p - expected > 10 * se  # ... and the test resolves it


def _linear_ekvae():
    """M = 1, linear-Gaussian decoder ``x = C a + c + N(0, 0.05 I)`` (an MLP without hidden
    layer): the model of the tests above."""
    return ekvae(
        4, PA, D, action_dim=U, transition=linear_transition(), decoder_hidden=(),
        likelihood="gaussian", obs_var=0.05, H=Hm, R=R, m0=M0, P0=P0, learn_R=False,
        learn_initial=False,
    )  # fmt: skip


def test_ekvae_bound_end_to_end_against_the_reference():
    """EKVAEBound through model, guide and parameter map, with an encoder of scale ``s =
    1e-4`` (so ``a ~ loc``): ``-(D + R)`` estimates ``log p(x | loc) + H(q(a|x)) + E_z L(loc)``
    with ``E_z L`` from the dense reference. And ``infer_latents`` gives the Kalman smoother
    (the smoothed means) at ``a = loc``."""
    model = _linear_ekvae()
    guide = ekvae_guide(model, hidden=(8,), seed=4)
    out_layer = guide.encoder.out
    out_layer.kernel[...] = out_layer.kernel[...].at[:, PA:].set(0.0)
    out_layer.bias[...] = out_layer.bias[...].at[PA:].set(-40.0)  # scale = min_scale = 1e-4
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(1, T, 4)))
    u = jnp.asarray(rng.normal(size=(1, T, U)))
    pure = lambda m: nnx.to_pure_dict(nnx.state(m, nnx.Param))
    params = {"encoder$params": pure(guide.encoder), "decoder$params": pure(model.decoder_net),
              "transition$params": pure(model.transition_net)}  # fmt: skip
    K = 4000
    bound = EKVAEBound(num_particles=1)

    @quick
    def run(keys):
        one = lambda k: bound.rate_distortion(k, params, model, guide, x, actions=u)
        out = jax.vmap(one)(keys)
        return -(out["distortion"] + out["rate"]), infer_latents(model, guide, params, x, u)

    values, latents = run(jax.random.split(jax.random.key(1), K))
    values = np.asarray(values)
    loc, scale = (np.asarray(v[0]) for v in guide.encoder(x))
    np.testing.assert_allclose(scale, 1e-4, rtol=1e-6)
    W = np.asarray(model.decoder_net.out.kernel[...])
    c = np.asarray(model.decoder_net.out.bias[...])
    log_px = -0.5 * np.sum((np.asarray(x[0]) - loc @ W - c) ** 2 / 0.05 + np.log(2 * np.pi * 0.05))
    entropy = np.sum(0.5 * np.log(2 * np.pi * np.e * scale**2))
    _, value, path_mean = _reference_bound(loc, np.asarray(u[0]), np.ones(T, bool), "smoother")
    se = values.std(ddof=1) / np.sqrt(K)
    assert abs(values.mean() - (log_px + entropy + value)) < 5 * se
    np.testing.assert_allclose(latents.mean[0], path_mean.reshape(T, D), rtol=1e-8, atol=1e-10)


def _set_affine(head, kernel, bias, var, min_var=1e-6):
    """A GaussianHead computing ``x @ kernel + bias`` with constant variances ``var``."""
    head.mean.kernel[...], head.mean.bias[...] = jnp.asarray(kernel), jnp.asarray(bias)
    head.raw_var.kernel[...] = jnp.zeros_like(head.raw_var.kernel[...])
    head.raw_var.bias[...] = jnp.broadcast_to(
        jnp.log(jnp.expm1(var - min_var)), head.raw_var.bias.shape
    )


def test_vhp_bound_is_below_the_exact_gaussian_log_density_and_tight_at_the_posterior():
    """Affine networks, constant variances: ``p(z) = N(c, W^T W + s I)`` exactly. A random
    ``q(zeta|z)`` gives a strict lower bound; the exact posterior ``N(S W (z - c) / s, S)``,
    ``S = (I + W W^T / s)^-1`` (diagonal for orthogonal rows of W, so in the mean-field family)
    gives ``log p(z)`` with zero variance."""
    rng = np.random.default_rng(0)
    W, c, s = rng.normal(size=(2, D)), rng.normal(size=D), 0.3
    W[1] -= (W[0] @ W[1]) / (W[0] @ W[0]) * W[0]  # orthogonal rows
    z = jnp.asarray(rng.normal(size=(5, D)) * 2)
    cov = W.T @ W + s * np.eye(D)
    diff = np.asarray(z) - c
    exact = -0.5 * (np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
                    + np.linalg.slogdet(2 * np.pi * cov)[1])  # fmt: skip
    vhp = VHP(D, 2, (), min_var=1e-6, rngs=nnx.Rngs(0))
    _set_affine(vhp.prior.head, W, c, s)
    bound = lambda key, n, analytic: quick(
        lambda k: vhp_bound(k, vhp.prior, vhp.posterior, z, num_samples=n, analytic_kl=analytic)
    )(key)  # compiled with the networks' current weights
    for analytic_kl in (True, False):
        assert np.all(np.asarray(bound(jax.random.key(1), 4000, analytic_kl)) < exact - 0.1)
    S = np.linalg.inv(np.eye(2) + W @ W.T / s)
    np.testing.assert_allclose(S, np.diag(np.diag(S)), atol=1e-12)
    _set_affine(vhp.posterior.head, (S @ W / s).T, -(S @ W / s) @ c, np.diag(S))
    tight = bound(jax.random.key(2), 1, False)
    np.testing.assert_allclose(tight, exact, rtol=1e-9)  # log p(z|zeta) p(zeta) / q(zeta|z)
    # the analytic-KL form has the same mean (its log p(z|zeta) term alone still varies)
    np.testing.assert_allclose(bound(jax.random.key(3), 20000, True), exact, rtol=2e-3)


def test_vhp_training_raises_its_bound_on_a_ring():
    """Gradient ascent on F_VHP over samples of a noisy ring (a non-Gaussian p*(z_0))."""
    rng = np.random.default_rng(0)
    angle = rng.uniform(0, 2 * np.pi, 256)
    z = np.stack([np.cos(angle), np.sin(angle), 0.1 * rng.normal(size=256)], -1) * 2
    vhp = VHP(D, 2, (32,), rngs=nnx.Rngs(1))
    graph, params = nnx.split(vhp, nnx.Param)
    opt = optax.adam(1e-2)

    def loss(p, key):
        v = nnx.merge(graph, p)
        return -jnp.mean(vhp_bound(key, v.prior, v.posterior, jnp.asarray(z)))

    @quick
    def train(p):
        def step(carry, key):
            p, s = carry
            value, g = jax.value_and_grad(loss)(p, key)
            updates, s = opt.update(g, s)
            return (optax.apply_updates(p, updates), s), value

        return jax.lax.scan(step, (p, opt.init(p)), jax.random.split(jax.random.key(0), 400))

    (params_new, _), values = train(params)
    evaluate = quick(lambda p: loss(p, jax.random.key(5)))
    before, after = float(evaluate(params)), float(evaluate(params_new))
    gaussian = np.mean(  # the best Gaussian's log-density: the VHP must beat it
        -0.5 * np.sum((z - z.mean(0)) ** 2 / z.var(0) + np.log(2 * np.pi * z.var(0)), -1)
    )
    assert after < before - 2.0
    assert -after > gaussian + 0.2


def test_model_guide_sites_and_shapes():
    model = ekvae(5, PA, D, num_bases=2, transition_hidden=(4,), decoder_hidden=(4,),
                  vhp_dim=2, vhp_hidden=(4,))  # fmt: skip
    guide = ekvae_guide(model, hidden=(4,))
    obs = jnp.asarray(np.random.default_rng(0).random((3, T, 5)))
    mask = jnp.ones((3, T), bool).at[1, 2].set(False)
    info = {}

    @quick
    def run(key):
        gtr = handlers.trace(handlers.seed(guide, key)).get_trace(obs, mask=mask)
        mtr = handlers.trace(handlers.replay(handlers.seed(model, key), gtr)).get_trace(
            obs, mask=mask
        )
        info["model"] = {k: (v["type"], v.get("is_observed")) for k, v in mtr.items()}
        info["shapes"] = {k: v["value"].shape for k, v in gtr.items() if v["type"] == "sample"}
        a = gtr["a"]["value"]
        # only this is computed (the rest is compiled away): the bound's q(a|x) is the guide's
        return guide.auxiliary_posterior(obs, mask=mask).log_prob(a) - gtr["a"]["fn"].log_prob(a)

    np.testing.assert_array_equal(run(jax.random.key(0)), 0.0)
    assert info["shapes"] == {"a": (3, T, PA), "z_0": (3, D), "z": (T - 1, 3, D), "zeta": (3, 2)}
    samples = {k for k, (t, _) in info["model"].items() if t == "sample"}
    assert samples == {"a", "z_0", "z", "zeta", "obs"}
    assert info["model"]["obs"][1] and not info["model"]["z"][1]
    params = {k for k, (t, _) in info["model"].items() if t == "param"}
    assert {"transition$params", "decoder$params", "vhp_prior$params", "R", "m0", "P0"} <= params
    with pytest.raises(ValueError, match="at least 2 steps"):
        model(obs[:, :1])
    with pytest.raises(ValueError, match="rectangular identity"):
        ekvae(5, 4, 3)
    with pytest.raises(ValueError, match="per-step mask"):
        model(obs, mask=jnp.ones((3, T, 2), bool))


def _rotations(n, seed):
    """Rotating 2-D points observed through a fixed random nonlinear map (6 features)."""
    rng = np.random.default_rng(seed)
    phase, speed = rng.uniform(0, 2 * np.pi, n), rng.uniform(0.2, 0.5, n) * rng.choice([-1, 1], n)
    angle = phase[:, None] + speed[:, None] * np.arange(T)
    W = rng.normal(size=(2, 6))
    x = np.tanh(np.stack([np.cos(angle), np.sin(angle)], -1) @ W)
    return jnp.asarray(x + 0.05 * rng.normal(size=x.shape))


def test_ekvae_with_vhp_trains_under_rewo():
    """Smoke test of the whole stack: CO with a calibrated D0, an initial phase that ends, and
    an ELBO that improves."""
    x = _rotations(32, 0)
    model = ekvae(6, PA, D, num_bases=3, transition_hidden=(16,), decoder_hidden=(32,),
                  likelihood="gaussian", obs_var=0.01, vhp_dim=2, vhp_hidden=(16,))  # fmt: skip
    guide = ekvae_guide(model, hidden=(32,))
    elbo = objectives.ConstrainedELBO(EKVAEBound(), calibration_steps=100)
    objective = training.elbo_objective(model, guide, elbo)
    optimizer = optax.adam(3e-3)
    batch = {"obs": x[:16]}
    state = jax.jit(lambda k: training.init_train_state(objective, optimizer, k, batch))(
        jax.random.key(0)
    )
    steps = 400
    train = quick(lambda state, data: training.train_steps(objective, optimizer, state, data,
                                                           steps, batch_size=16))  # fmt: skip
    state, metrics = train(state, {"obs": x})
    elbo = np.asarray(metrics["elbo"])
    assert np.all(np.isfinite(elbo)) and int(state.step) == steps
    assert elbo[-20:].mean() > elbo[:20].mean() + 50
    phase, d0 = np.asarray(metrics["initial_phase"]), np.asarray(metrics["d0"])
    assert phase[0] == 1.0 and phase[-1] == 0.0
    assert np.isnan(d0[50]) and np.isfinite(d0[-1])
    assert np.all(np.isfinite(np.asarray(metrics["lagrange_multiplier"])))


# ---- acting: the belief step and the world model ------------------------------------------------


def test_belief_step_observed_step_by_step_equals_the_models_filter():
    """The EKF belief of ``model.belief_step(encoder=guide.encoder)``, conditioned on the
    encoder means and predicted through the actions step by step (a missing step included),
    equals the filtered beliefs of the model's EKF (``infer_latents(posterior="filter")``: the
    Kalman filter of the structure the EKF linearised), in float64."""
    model = ekvae(5, PA, D, action_dim=U, num_bases=3, transition_hidden=(8,),
                  decoder_hidden=(8,), likelihood="gaussian", seed=2)  # fmt: skip
    guide = ekvae_guide(model, hidden=(8,), seed=3)
    pure = lambda m: nnx.to_pure_dict(nnx.state(m, nnx.Param))
    params = {"encoder$params": pure(guide.encoder), "decoder$params": pure(model.decoder_net),
              "transition$params": pure(model.transition_net)}  # fmt: skip
    rng = np.random.default_rng(5)
    n = 3
    x = rng.normal(size=(n, T, 5))
    u = rng.normal(size=(n, T, U))
    mask = np.ones((n, T), bool)
    mask[1, 2] = mask[2, 4] = False
    x[1, 2] = np.nan  # a missing step's entries may hold anything
    with handlers.substitute(data=params):
        step = model.belief_step(encoder=guide.encoder)
    b, key = step.init(n), jax.random.key(0)
    means, covs = [], []
    for t in range(T):
        b = step.condition(b, x[:, t], mask[:, t], key)
        means.append(b.mean)
        covs.append(b.cov)
        b = step.predict(b, u[:, t], key)
    ref = infer_latents(model, guide, params, x, u, mask, posterior="filter")
    assert ref.mean.dtype == jnp.float64
    np.testing.assert_allclose(np.stack(means, 1), ref.mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(np.stack(covs, 1), ref.cov, rtol=1e-8, atol=1e-10)
    whole = step.filter(x, u, mask, key)
    np.testing.assert_allclose(whole.mean, ref.mean, rtol=1e-8, atol=1e-10)
    assert step.reward is None and step.features(b).shape == (n, D)


@pytest.mark.slow  # the runner trains and acts with it by default (tests/test_families.py)
def test_ekvae_world_model_on_state_vectors_trains_and_acts():
    from rl.world_models.ekvae import ekvae_world_model
    from tests.world_model_checks import trains_and_acts

    wm = ekvae_world_model({"position": 3, "velocity": 2}, 2, latent_dim=4, hidden=8, seed=0,
                           num_bases=2)  # fmt: skip
    history = trains_and_acts(wm, latent=4, T=T)
    assert all(np.isfinite(h["reward_nll"]) and h["reward_nll"] > 0 for h in history)
