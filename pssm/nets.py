"""Small Flax NNX networks shared by the models and guides, and their NumPyro registration.

Every network here is an ``nnx.Module`` built eagerly (outside any model) and used inside a
NumPyro program through :func:`register`, which wraps ``numpyro.contrib.module.nnx_module``
(point estimates of the weights: one ``numpyro.param`` site ``"<name>$params"``) or
``random_nnx_module`` (weights drawn from a prior, for Bayesian treatment). A model and a guide
that register the same module under the same name share one parameter.

* :class:`MLP`: ``x -> f_L(... f_1(x))`` with ``f_i(x) = act(W_i x + c_i)`` and a linear output,
  optionally with Monte-Carlo dropout after every hidden activation (:class:`MCDropout`:
  inverted dropout with explicit keys or explicit uniform noise; see :mod:`pssm.layers`).
* :class:`GaussianHead`: ``x -> (mu, sigma^2)`` with ``sigma^2 = softplus(W x + c) + floor``;
  :class:`GaussianMLP` puts an MLP in front of it (encoders, priors, inference networks).
* :func:`scaled_sigmoid` / :class:`Bounded`: ``f(x) = lo + (hi - lo) sigmoid(x + c)`` with
  ``c = logit((v0 - lo) / (hi - lo))`` so ``f(0) = v0``: VRKN's squashing of the diagonal
  transition entries ``A_t in [0.1, 0.99]`` (``0.9`` at zero input) and transition variances
  ``Q_t in [0.001, 0.1]`` (``0.01`` at zero), keeping the latent dynamics stable
  (Becker & Neumann 2022, "On Uncertainty in Deep State Space Models for Model-Based RL", Sec. 3.2);
  :class:`DiagonalTransition` emits ``(A_t, b_t, Q_t)`` that way, and :class:`VRKNTransition`
  (VRKN's GRU-gated dynamics model, also KalMamba's post-Mamba network).
* :class:`GRU`: ``(h, x) -> h'``, the gated recurrent unit of Cho et al. (2014) on
  ``flax.nnx.GRUCell``, as used by the RSSM's deterministic path (Hafner et al. 2019, PlaNet).
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from flax import nnx
from numpyro.contrib.module import nnx_module, random_nnx_module

Activation = Callable[[jax.Array], jax.Array]


def default_param_dtype():
    """The default floating dtype (float64 when ``jax_enable_x64`` is on, else float32)."""
    return jnp.result_type(float)


def register(name: str, module: nnx.Module, prior=None) -> Callable:
    """Use an eagerly built NNX ``module`` inside a NumPyro program.

    Args:
        name: parameter site name (``"<name>$params"``); the same name in a model and its guide
            is one shared parameter.
        module: the network, built outside the program (its weights are the initial values).
        prior: ``None`` for point-estimated weights (``nnx_module``), else a distribution, a
            dict of distributions or a callable ``(name, shape) -> distribution`` for weights
            sampled from a prior (``random_nnx_module``).

    Returns:
        The network as a function of its call arguments. Call ``register`` outside any
        ``numpyro.contrib.control_flow.scan`` (parameter sites inside a scan body are not
        substituted) and use the returned function freely inside it.
    """
    if prior is None:
        return nnx_module(name, module)
    return random_nnx_module(name, module, prior)


class MCDropout(nnx.Module):
    """Inverted dropout driven by an explicit PRNG key (Monte-Carlo dropout when kept on).

    ``MCDropout(rate)(x, key)`` zeroes each entry with probability ``rate`` and scales the rest
    by ``1 / (1 - rate)``, so ``E[y] = x``; ``key=None`` (or ``rate=0``) is the identity. The
    module holds no parameters and no state: the same ``key`` gives the same mask.

    The mask is ``u >= rate`` for uniform noise ``u ~ U(0, 1)`` of ``x``'s shape, drawn from
    ``key``, or given directly as ``noise=`` (e.g. drawn at a NumPyro sample site from
    :meth:`noise_distribution`, so that a model and its guide share the masks; a uniform site
    is reparameterised and continuous, so every NumPyro ELBO accepts it).
    """

    def __init__(self, rate: float):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        self.rate = float(rate)

    @staticmethod
    def noise_distribution(shape) -> dist.Distribution:
        """``U(0, 1)`` noise of batch shape ``shape`` (add ``.to_event`` as needed)."""
        return dist.Uniform(0.0, 1.0).expand(tuple(shape))

    def __call__(
        self, x: jax.Array, key: jax.Array | None = None, *, noise: jax.Array | None = None
    ) -> jax.Array:
        if self.rate == 0.0 or (key is None and noise is None):
            return x
        if noise is None:
            noise = jax.random.uniform(key, jnp.shape(x), dtype=jnp.result_type(x))
        return jnp.where(noise >= self.rate, x / (1.0 - self.rate), jnp.zeros_like(x))


class MLP(nnx.Module):
    """Multi-layer perceptron ``in_features -> hidden... -> out_features`` (linear output).

    With ``out_features=None`` the output is the last hidden layer (after its activation).
    Weights LeCun-normal, biases zero (``nnx.Linear``'s defaults). This is the project's one MLP:
    models and guides register it (:func:`register`), agents keep its parameters as a pure dict
    (:func:`rl.agents._nets.network`).

    With ``dropout > 0`` an :class:`MCDropout` follows every hidden activation (Monte-Carlo
    dropout): ``mlp(x, key)`` draws the masks from ``key`` (one split per hidden layer),
    ``mlp(x, noise=u)`` takes them from uniform noise ``u`` ``(..., noise_size)`` (the hidden
    layers' noise concatenated, e.g. drawn at a NumPyro sample site); neither, or ``dropout=0``:
    no dropout.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int | None = None,
        *,
        activation: Activation = nnx.elu,
        dropout: float = 0.0,
        param_dtype=None,
        rngs: nnx.Rngs,
    ):
        param_dtype = param_dtype or default_param_dtype()
        sizes = [in_features, *hidden]
        # named attributes rather than a list: string keys in the parameter pytree
        self.num_hidden = len(hidden)
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            setattr(self, f"layer{i}", nnx.Linear(n_in, n_out, param_dtype=param_dtype, rngs=rngs))
        self.out = (
            None
            if out_features is None
            else nnx.Linear(sizes[-1], out_features, param_dtype=param_dtype, rngs=rngs)
        )
        self.activation = activation
        self.out_features = sizes[-1] if out_features is None else out_features
        self.dropout = MCDropout(dropout)
        self._widths = tuple(int(h) for h in hidden)
        self.noise_size = sum(self._widths)

    def __call__(
        self, x: jax.Array, key: jax.Array | None = None, *, noise: jax.Array | None = None
    ) -> jax.Array:
        n = self.num_hidden
        keys = [None] * n if key is None or noise is not None else list(jax.random.split(key, n))
        noises = [None] * n
        if noise is not None:
            if noise.shape[-1] != self.noise_size:
                raise ValueError(
                    f"dropout noise has {noise.shape[-1]} entries, expected {self.noise_size}"
                )
            cuts = np.cumsum((0, *self._widths))
            noises = [noise[..., cuts[i] : cuts[i + 1]] for i in range(n)]
        for i in range(n):
            x = self.activation(getattr(self, f"layer{i}")(x))
            x = self.dropout(x, keys[i], noise=noises[i])
        return x if self.out is None else self.out(x)


def _inverse_softplus(y):
    return float(np.log(np.expm1(y)))


class GaussianHead(nnx.Module):
    """``x -> (mean, variance)`` of a diagonal Gaussian of size ``out_features``.

    ``mean = W_m x + c_m`` and ``variance = softplus(W_v x + c_v) + min_var``, with ``c_v``
    initialised so that the variance is ``init_var`` at zero input.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        min_var: float = 1e-3,
        init_var: float = 1.0,
        param_dtype=None,
        rngs: nnx.Rngs,
    ):
        if not init_var > min_var:
            raise ValueError(f"init_var={init_var} must exceed min_var={min_var}")
        param_dtype = param_dtype or default_param_dtype()
        shift = _inverse_softplus(init_var - min_var)
        self.mean = nnx.Linear(in_features, out_features, param_dtype=param_dtype, rngs=rngs)
        self.raw_var = nnx.Linear(
            in_features,
            out_features,
            bias_init=nnx.initializers.constant(shift),
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.min_var = min_var

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.mean(x), jax.nn.softplus(self.raw_var(x)) + self.min_var


def scaled_sigmoid(x: jax.Array, lo: float, hi: float, v0: float) -> jax.Array:
    """``lo + (hi - lo) sigmoid(x + logit((v0 - lo) / (hi - lo)))``: values in ``(lo, hi)``,
    ``v0`` at ``x = 0``, increasing (VRKN's bounded activation)."""
    if not lo < v0 < hi:
        raise ValueError(f"need lo < v0 < hi, got lo={lo}, v0={v0}, hi={hi}")
    shift = float(np.log((v0 - lo) / (hi - v0)))
    return lo + (hi - lo) * jax.nn.sigmoid(x + shift)


class Bounded(nnx.Module):
    """Linear layer squashed by :func:`scaled_sigmoid` into ``(lo, hi)``, ``v0`` at zero input.

    E.g. ``Bounded(n, d, 0.1, 0.99, 0.9)`` for diagonal transition entries and
    ``Bounded(n, d, 1e-3, 0.1, 1e-2)`` for transition variances (VRKN).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        lo: float,
        hi: float,
        v0: float,
        *,
        param_dtype=None,
        rngs: nnx.Rngs,
    ):
        scaled_sigmoid(jnp.zeros(()), lo, hi, v0)  # validates the bounds
        param_dtype = param_dtype or default_param_dtype()
        self.linear = nnx.Linear(in_features, out_features, param_dtype=param_dtype, rngs=rngs)
        self.lo, self.hi, self.v0 = lo, hi, v0

    def __call__(self, x: jax.Array) -> jax.Array:
        return scaled_sigmoid(self.linear(x), self.lo, self.hi, self.v0)


class GRU(nnx.Module):
    """Gated recurrent unit ``h' = GRU(h, x)`` (Cho et al. 2014) on ``flax.nnx.GRUCell``:

        r = sigma(W_r x + U_r h + c_r),  u = sigma(W_u x + U_u h + c_u),
        n = tanh(W_n x + c_n + r * U_n h),  h' = (1 - u) * n + u * h.

    Takes and returns the state alone (no separate output); leading axes are batch axes.
    """

    def __init__(self, in_features: int, hidden_features: int, *, param_dtype=None, rngs):
        param_dtype = param_dtype or default_param_dtype()
        self.cell = nnx.GRUCell(in_features, hidden_features, param_dtype=param_dtype, rngs=rngs)
        self.hidden_features = hidden_features

    def __call__(self, h: jax.Array, x: jax.Array) -> jax.Array:
        h, _ = self.cell(h, x)
        return h


class GaussianMLP(nnx.Module):
    """:class:`MLP` trunk followed by a :class:`GaussianHead`: ``x -> (mean, variance)``; with
    ``dropout > 0`` the trunk's MC dropout takes masks from ``key`` or ``noise`` (``(...,
    noise_size)``) as :class:`MLP` does."""

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        *,
        min_var: float = 1e-3,
        init_var: float = 1.0,
        activation: Activation = nnx.elu,
        dropout: float = 0.0,
        param_dtype=None,
        rngs: nnx.Rngs,
    ):
        self.trunk = MLP(
            in_features, hidden, activation=activation, dropout=dropout,
            param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.head = GaussianHead(
            self.trunk.out_features,
            out_features,
            min_var=min_var,
            init_var=init_var,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.noise_size = self.trunk.noise_size

    def __call__(self, x: jax.Array, key=None, *, noise=None) -> tuple[jax.Array, jax.Array]:
        return self.head(self.trunk(x, key, noise=noise))


class DiagonalTransition(nnx.Module):
    """``x -> (A, b, Q)``: diagonal locally-linear dynamics ``z' ~ N(A * z + b, diag(Q))``.

    An :class:`MLP` trunk, then ``A = Bounded(*A_bounds)``, ``b`` linear and
    ``Q = Bounded(*Q_bounds)``, bounds given as ``(lo, hi, value at zero input)``; the defaults
    are VRKN's: ``A in [0.1, 0.99]`` (0.9), ``Q in [0.001, 0.1]`` (0.01).
    """

    def __init__(
        self,
        in_features: int,
        latent_dim: int,
        hidden: Sequence[int],
        *,
        A_bounds: tuple[float, float, float] = (0.1, 0.99, 0.9),
        Q_bounds: tuple[float, float, float] = (1e-3, 0.1, 1e-2),
        activation: Activation = nnx.elu,
        param_dtype=None,
        rngs: nnx.Rngs,
    ):
        self.trunk = MLP(
            in_features, hidden, activation=activation, param_dtype=param_dtype, rngs=rngs
        )
        n, kw = self.trunk.out_features, dict(param_dtype=param_dtype, rngs=rngs)
        self.A = Bounded(n, latent_dim, *A_bounds, **kw)
        self.b = nnx.Linear(
            n, latent_dim, param_dtype=param_dtype or default_param_dtype(), rngs=rngs
        )
        self.Q = Bounded(n, latent_dim, *Q_bounds, **kw)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x = self.trunk(x)
        return self.A(x), self.b(x), self.Q(x)


class VRKNTransition(nnx.Module):
    """``(mu_t^+, a_t) -> (A_t, b_t, Q_t)``: VRKN's dynamics model, a gated transition network
    (Becker & Neumann 2022, Sec. 3.2, Fig. 3b), used by :mod:`pssm.vrkn` (fed the filtered mean
    ``mu_t^+``) and as KalMamba's post-Mamba network by :mod:`pssm.kalmamba` (fed the backbone's
    ``m_t``, SiLU; KalMamba paper, Table 2):

        x = drop(act(W_1 [mu, a] + c_1)),  g = drop(GRU(h=mu, x)),
        y = drop(act(W_2 g + c_2)),  (A~, Q~, b) = W_3 y + c_3,
        A = scaled_sigmoid(A~; A_bounds),  Q = scaled_sigmoid(Q~; Q_bounds),

    with ``W_3, c_3`` initialised at zero, so that training starts from the damped resting point
    ``A = 0.9, b = 0, Q = 0.01`` whatever ``mu`` is (a random ``W_3`` makes ``b_t(mu)`` a
    feedback with gain above 1 at VRKN's sizes: the untrained filter diverges on long sequences).

    Dropout masks come from ``key`` (fresh MC-dropout draws) or from uniform ``noise``
    ``(..., 2 hidden + d)`` (of the three layers, concatenated; see :class:`MCDropout`);
    neither: no dropout.
    """

    def __init__(
        self,
        latent_dim: int,
        action_dim: int,
        hidden: int,
        *,
        rate: float = 0.1,
        A_bounds: tuple[float, float, float] = (0.1, 0.99, 0.9),
        Q_bounds: tuple[float, float, float] = (1e-3, 0.1, 1e-2),
        activation: Activation = nnx.relu,
        param_dtype=None,
        rngs: nnx.Rngs,
    ):
        scaled_sigmoid(jnp.zeros(()), *A_bounds)  # validates the bounds
        scaled_sigmoid(jnp.zeros(()), *Q_bounds)
        kw = dict(param_dtype=param_dtype or default_param_dtype(), rngs=rngs)
        d, h = int(latent_dim), int(hidden)
        self.pre = nnx.Linear(d + int(action_dim), h, **kw)
        self.gru = GRU(h, d, **kw)
        self.post = nnx.Linear(d, h, **kw)
        # zero at initialisation: the damped resting point of the class docstring (a random W_3
        # grew |mu_t| ~1.13x per step at VRKN's sizes and overflowed float32 before T = 1024)
        self.out = nnx.Linear(h, 3 * d, kernel_init=nnx.initializers.zeros_init(), **kw)
        self.dropout = MCDropout(rate)
        self.activation = activation
        self.A_bounds, self.Q_bounds = tuple(A_bounds), tuple(Q_bounds)
        self.noise_size = 2 * h + d
        self._splits = (h, h + d)

    def __call__(self, mean, action, key=None, noise=None):
        if noise is not None:
            parts = jnp.split(noise, self._splits, axis=-1)
            drop = [lambda x, u=u: self.dropout(x, noise=u) for u in parts]
        elif key is not None:
            drop = [lambda x, k=k: self.dropout(x, k) for k in jax.random.split(key, 3)]
        else:
            drop = [lambda x: x] * 3
        x = drop[0](self.activation(self.pre(jnp.concatenate([mean, action], axis=-1))))
        g = drop[1](self.gru(mean, x))
        y = drop[2](self.activation(self.post(g)))
        A_raw, Q_raw, b = jnp.split(self.out(y), 3, axis=-1)
        A = scaled_sigmoid(A_raw, *self.A_bounds)
        Q = scaled_sigmoid(Q_raw, *self.Q_bounds)
        return A, b, Q
