"""Mamba: selective state space blocks (Gu & Dao 2023), in pure JAX / Flax NNX.

One layer (:class:`SelectiveSSM`, the "Mamba mixer" of Gu & Dao 2023, "Mamba: Linear-Time
Sequence Modeling with Selective State Spaces", Sec. 3 and Fig. 3) maps ``u_t`` (size
``d_model``) to ``y_t`` through ``E = expand * d_model`` channels with ``N = d_state`` states each:

    [x_t, g_t] = W_in u_t                                   input and gate branches (size E)
    x_t <- silu(sum_{k<K} c_k * x_{t-K+1+k} + c_0)          causal depthwise conv, width K = d_conv
    Delta_t = softplus(W_dt (W_r x_t) + c_dt)               (E,)    selective step size
    B_t = W_B x_t,  C_t = W_C x_t                           (N,)    selective input / read-out
    A = -exp(A_log)                                         (E, N)  diagonal, S4D-real init
                                                                    A_{e,n} = -(n + 1)
    Abar_t = exp(Delta_t A),  Bbar_t = (Delta_t A)^{-1} (exp(Delta_t A) - 1) Delta_t B_t
                                                            zero-order hold (paper Eq. 4)
    h_t = Abar_t * h_{t-1} + Bbar_t * x_t                   (E, N) elementwise
    y_t = W_out ((C_t . h_t + D * x_t) * silu(g_t))

(The official CUDA kernels simplify ``Bbar_t`` to ``Delta_t B_t``; here it is the exact ZOH of
the paper's Eq. 4, which is cheap for a diagonal ``A``.) Initialisation as the official code:
``A`` S4D-real (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal State
Space Models"), ``D = 1``, ``Delta``'s bias such that ``softplus(c_dt)`` is log-uniform in
``[dt_min, dt_max]``, ``W_dt ~ U(-R^{-1/2}, R^{-1/2})`` for rank ``R``.

The recurrence ``h_t = a_t * h_{t-1} + b_t`` is a first-order linear recurrence: the pairs
``(a, b)`` compose associatively, ``(a_1, b_1) o (a_2, b_2) = (a_2 a_1, a_2 b_1 + b_2)``, so the
states of all steps are one ``lax.associative_scan`` (``parallel=True``, ``O(log T)`` depth)
or a ``lax.scan`` (``parallel=False``, ``O(T)`` depth, no ``(T, E, N)`` intermediate). Both
give the same numbers up to rounding.

:class:`MambaBlock` is the pre-norm residual block ``u + SelectiveSSM(RMSNorm(u))`` and
:class:`Mamba` a stack of blocks with a final RMSNorm (the official ``MambaLMHeadModel``
layout). Every layer is recurrent: its state is the conv buffer (the last ``K - 1`` conv
inputs) and ``h``, a :class:`MambaState`. A call takes an optional starting state and returns
the state after its last step (or after every step, ``return_states=True``), so a sequence
can be processed in pieces, or one step at a time (a length-1 sequence), with the same result.
Shapes: inputs ``(..., T, d_model)``, any leading batch axes.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from .nets import default_param_dtype


class MambaState(NamedTuple):
    """Recurrent state of one :class:`SelectiveSSM` layer.

    Attributes:
        conv: ``(..., d_conv - 1, E)``: the last ``d_conv - 1`` inputs of the causal conv.
        ssm: ``(..., E, N)``: the selective state ``h``.
    """

    conv: jax.Array
    ssm: jax.Array


def zoh(delta: jax.Array, A: jax.Array, B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Zero-order hold of the diagonal ``(A, B)`` with steps ``delta``.

    Args:
        delta: ``(..., E)`` positive steps.
        A: ``(E, N)`` negative diagonal.
        B: ``(..., N)`` input vectors.

    Returns:
        ``(Abar, Bbar)``, both ``(..., E, N)``: ``exp(delta A)`` and
        ``(exp(delta A) - 1) / A * B``.
    """
    dA = delta[..., None] * A
    return jnp.exp(dA), jnp.expm1(dA) / A * B[..., None, :]


def _combine(earlier, later):
    a1, b1 = earlier
    a2, b2 = later
    return a2 * a1, a2 * b1 + b2


def selective_scan(
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    x: jax.Array,
    h0: jax.Array,
    *,
    parallel: bool = True,
    return_states: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``h_t = Abar_t * h_{t-1} + Bbar_t * x_t``, ``y_t = C_t . h_t`` over the time axis ``-2``.

    Args:
        delta: ``(..., T, E)``; A: ``(E, N)``; B, C: ``(..., T, N)``; x: ``(..., T, E)``.
        h0: ``(..., E, N)`` state before the first step.
        parallel: ``lax.associative_scan`` over time instead of ``lax.scan``.
        return_states: return ``h_t`` of every step ``(..., T, E, N)`` instead of the last.

    Returns:
        ``(y (..., T, E), h)``.
    """
    if not parallel:
        to_time = lambda v: jnp.moveaxis(v, -2, 0)

        def step(h, inputs):
            d_t, B_t, C_t, x_t = inputs
            a, b = zoh(d_t, A, B_t)
            h = a * h + b * x_t[..., None]
            y = jnp.einsum("...en,...n->...e", h, C_t)
            return h, (y, h) if return_states else y

        h_last, out = lax.scan(step, h0, tuple(map(to_time, (delta, B, C, x))))
        if return_states:
            y, hs = out
            return jnp.moveaxis(y, 0, -2), jnp.moveaxis(hs, 0, -3)
        return jnp.moveaxis(out, 0, -2), h_last
    a, b = zoh(delta, A, B)
    b = b * x[..., None]
    b = b.at[..., 0, :, :].add(a[..., 0, :, :] * h0)  # fold the initial state into step 0
    _, hs = lax.associative_scan(_combine, (a, b), axis=a.ndim - 3)
    y = jnp.einsum("...ten,...tn->...te", hs, C)
    return y, hs if return_states else hs[..., -1, :, :]


def causal_conv(
    x: jax.Array, buffer: jax.Array, kernel: jax.Array, bias: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Depthwise causal convolution ``y_t = sum_k kernel_k * x_{t-K+1+k} + bias``.

    Args:
        x: ``(..., T, E)``; buffer: ``(..., K-1, E)``, the inputs before ``x_0``;
        kernel: ``(K, E)``; bias: ``(E,)``.

    Returns:
        ``(y (..., T, E), padded (..., T + K - 1, E))``: the outputs and the buffer-prefixed
        inputs (whose last ``K - 1`` rows are the next buffer).
    """
    K, T = kernel.shape[0], x.shape[-2]
    padded = jnp.concatenate([buffer, x], axis=-2)
    y = sum(kernel[k] * padded[..., k : k + T, :] for k in range(K)) + bias
    return y, padded


def _conv_buffers(padded: jax.Array, K: int, T: int, return_states: bool) -> jax.Array:
    """The conv buffer after the last step ``(..., K-1, E)``, or after every step
    ``(..., T, K-1, E)``."""
    if not return_states:
        return padded[..., T:, :]
    rows = [padded[..., j + 1 : j + 1 + T, :] for j in range(K - 1)]
    if not rows:
        return jnp.zeros((*padded.shape[:-2], T, 0, padded.shape[-1]), padded.dtype)
    return jnp.stack(rows, axis=-2)


def _check_features(u, d_model):
    if u.ndim < 2 or u.shape[-1] != d_model:
        raise ValueError(f"input has shape {u.shape}, expected (..., T, {d_model})")


class SelectiveSSM(nnx.Module):
    """The Mamba mixer (equations in the module docstring).

    Args:
        d_model: input and output size.
        d_state: ``N``, states per channel (paper: 16; KalMamba: 64).
        d_conv: ``K``, width of the causal depthwise convolution (paper: 4; KalMamba: 2).
        expand: ``E = expand * d_model``.
        dt_rank: rank of ``Delta``'s projection; ``None`` for ``ceil(d_model / 16)``.
        dt_min, dt_max, dt_init_floor: initial ``Delta`` range (log-uniform) and floor.
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        param_dtype=None,
        rngs: nnx.Rngs,
    ):
        if min(d_model, d_state, d_conv, expand) < 1:
            raise ValueError("d_model, d_state, d_conv and expand must be positive")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        dtype = param_dtype or default_param_dtype()
        E, N = expand * d_model, d_state
        R = dt_rank or math.ceil(d_model / 16)
        self.d_model, self.d_inner, self.d_state = d_model, E, N
        self.d_conv, self.dt_rank = d_conv, R
        kw = dict(param_dtype=dtype, rngs=rngs)
        self.in_proj = nnx.Linear(d_model, 2 * E, use_bias=False, **kw)
        bound = 1.0 / math.sqrt(d_conv)  # PyTorch Conv1d default, fan-in d_conv (depthwise)
        init = lambda shape: jax.random.uniform(rngs.params(), shape, dtype, -bound, bound)
        self.conv_kernel = nnx.Param(init((d_conv, E)))
        self.conv_bias = nnx.Param(init((E,)))
        self.x_proj = nnx.Linear(E, R + 2 * N, use_bias=False, **kw)
        dt = jnp.exp(
            jax.random.uniform(rngs.params(), (E,), dtype) * (math.log(dt_max) - math.log(dt_min))
            + math.log(dt_min)
        )
        dt = jnp.maximum(dt, dt_init_floor)
        self.dt_proj = nnx.Linear(
            R,
            E,
            kernel_init=lambda key, shape, dt_: jax.random.uniform(
                key, shape, dt_, -(R**-0.5), R**-0.5
            ),
            bias_init=lambda *_: dt + jnp.log(-jnp.expm1(-dt)),  # inverse softplus
            **kw,
        )
        self.A_log = nnx.Param(jnp.log(jnp.tile(jnp.arange(1, N + 1, dtype=dtype), (E, 1))))
        self.D = nnx.Param(jnp.ones((E,), dtype))
        self.out_proj = nnx.Linear(E, d_model, use_bias=False, **kw)

    def init_state(self, batch_shape=(), dtype=None) -> MambaState:
        """The zero state (no inputs seen) with leading axes ``batch_shape``."""
        dtype = dtype or self.D[...].dtype
        b = tuple(batch_shape)
        return MambaState(
            jnp.zeros((*b, self.d_conv - 1, self.d_inner), dtype),
            jnp.zeros((*b, self.d_inner, self.d_state), dtype),
        )

    def __call__(
        self,
        u: jax.Array,
        state: MambaState | None = None,
        *,
        parallel: bool = True,
        return_states: bool = False,
    ) -> tuple[jax.Array, MambaState]:
        """``u (..., T, d_model) -> (y (..., T, d_model), state)``, from ``state`` (zero if
        ``None``); the returned state is the one after the last step, or with
        ``return_states`` after every step (an extra time axis ``T`` before the state's own)."""
        _check_features(u, self.d_model)
        T = u.shape[-2]
        if state is None:
            state = self.init_state(u.shape[:-2], jnp.result_type(u, self.D[...]))
        x, gate = jnp.split(self.in_proj(u), 2, axis=-1)
        x, padded = causal_conv(x, state.conv, self.conv_kernel[...], self.conv_bias[...])
        x = jax.nn.silu(x)
        dt, B, C = jnp.split(self.x_proj(x), [self.dt_rank, self.dt_rank + self.d_state], -1)
        delta = jax.nn.softplus(self.dt_proj(dt))
        A = -jnp.exp(self.A_log[...])
        y, h = selective_scan(
            delta, A, B, C, x, state.ssm, parallel=parallel, return_states=return_states
        )
        y = (y + self.D[...] * x) * jax.nn.silu(gate)
        buffers = _conv_buffers(padded, self.d_conv, T, return_states)
        return self.out_proj(y), MambaState(buffers, h)


class MambaBlock(nnx.Module):
    """Pre-norm residual block ``u + SelectiveSSM(RMSNorm(u))``; arguments as
    :class:`SelectiveSSM` (``norm_eps``: the RMSNorm's epsilon)."""

    def __init__(self, d_model: int, *, norm_eps: float = 1e-5, param_dtype=None, rngs, **ssm):
        dtype = param_dtype or default_param_dtype()
        self.norm = nnx.RMSNorm(d_model, epsilon=norm_eps, param_dtype=dtype, rngs=rngs)
        self.mixer = SelectiveSSM(d_model, param_dtype=dtype, rngs=rngs, **ssm)

    def init_state(self, batch_shape=(), dtype=None) -> MambaState:
        return self.mixer.init_state(batch_shape, dtype)

    def __call__(self, u, state=None, *, parallel=True, return_states=False):
        _check_features(u, self.mixer.d_model)
        y, state = self.mixer(self.norm(u), state, parallel=parallel, return_states=return_states)
        return u + y, state


class Mamba(nnx.Module):
    """``num_blocks`` :class:`MambaBlock` s and a final RMSNorm: ``(..., T, d_model)`` to
    ``(..., T, d_model)``; its state is a tuple with one :class:`MambaState` per block.
    Keyword arguments as :class:`SelectiveSSM`."""

    def __init__(
        self,
        d_model: int,
        num_blocks: int = 2,
        *,
        norm_eps: float = 1e-5,
        param_dtype=None,
        rngs: nnx.Rngs,
        **ssm,
    ):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        dtype = param_dtype or default_param_dtype()
        self.num_blocks, self.d_model = num_blocks, d_model
        for i in range(num_blocks):  # named attributes: string keys in the parameter pytree
            block = MambaBlock(d_model, norm_eps=norm_eps, param_dtype=dtype, rngs=rngs, **ssm)
            setattr(self, f"block{i}", block)
        self.norm = nnx.RMSNorm(d_model, epsilon=norm_eps, param_dtype=dtype, rngs=rngs)

    def blocks(self) -> list[MambaBlock]:
        return [getattr(self, f"block{i}") for i in range(self.num_blocks)]

    def init_state(self, batch_shape=(), dtype=None) -> tuple[MambaState, ...]:
        """The zero state of every block, leading axes ``batch_shape``."""
        return tuple(b.init_state(batch_shape, dtype) for b in self.blocks())

    def __call__(
        self,
        u: jax.Array,
        state: tuple[MambaState, ...] | None = None,
        *,
        parallel: bool = True,
        return_states: bool = False,
    ) -> tuple[jax.Array, tuple[MambaState, ...]]:
        """``(y, states)``: outputs ``(..., T, d_model)`` and the blocks' states after the last
        step (``return_states``: after every step)."""
        if state is not None and len(state) != self.num_blocks:
            raise ValueError(f"state has {len(state)} blocks, expected {self.num_blocks}")
        states = []
        for i, block in enumerate(self.blocks()):
            u, s = block(
                u,
                None if state is None else state[i],
                parallel=parallel,
                return_states=return_states,
            )
            states.append(s)
        return self.norm(u), tuple(states)
