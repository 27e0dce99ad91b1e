"""Training objectives: the contract between a loss and the training loop.

An :class:`Objective` is four pure functions over pytrees. The loop minimises
``loss(params, aux, key, batch)`` over ``params`` by gradient descent; ``aux`` is state that
receives no gradient (NumPyro ``mutable`` sites such as batch statistics, a Lagrange multiplier,
target networks, moving averages) and is threaded through the steps.

:func:`elbo_objective` builds one from a NumPyro model, guide and ELBO. With ``theta`` the
model parameters, ``phi`` the guide parameters and ``x`` a minibatch, NumPyro's ELBOs estimate

    L(theta, phi; x) = E_{q_phi(z | x)}[log p_theta(x, z) - log q_phi(z | x)]

and the loss is ``-L``. Parameters are optimised unconstrained; ``constrain`` maps them through
the bijections ``biject_to(constraint)`` of their ``numpyro.param`` sites, exactly as
``numpyro.infer.SVI`` does (Kucukelbir et al., 2017, "Automatic Differentiation Variational
Inference", JMLR 18).

Objective wrappers (KL balancing, free nats, Lagrangian constraints, extra loss terms) plug into
:func:`elbo_objective` through the small :class:`MetricsELBO` protocol below.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import optax
from numpyro.infer import SVI

PyTree = Any


class Objective(NamedTuple):
    """A trainable objective, as pure functions.

    Attributes:
        init: ``(key, batch) -> (params, aux)``. ``params`` is the unconstrained trainable pytree;
            ``aux`` the non-gradient state pytree (``()`` when there is none).
        loss: ``(params, aux, key, batch) -> (loss, metrics, aux)``: a scalar to minimise, a dict
            of scalar metrics to log, and ``aux`` as left by the forward pass (return the input
            ``aux`` unchanged when the forward pass keeps no state). Must be traceable by
            ``jax.jit`` and differentiable in ``params``; ``aux`` is never differentiated.
        constrain: ``params -> values`` a user reads (e.g. positive scales instead of their
            logarithms).
        update_aux: optional ``(aux, params, metrics) -> aux`` applied after each optimizer
            step, with the updated ``params`` and the step's ``metrics`` (a Lagrange multiplier
            update, a target network's moving average). ``None`` keeps ``aux`` as ``loss``
            returned it.
    """

    init: Callable[[jax.Array, PyTree], tuple[PyTree, PyTree]]
    loss: Callable[[PyTree, PyTree, jax.Array, PyTree], tuple[jax.Array, dict, PyTree]]
    constrain: Callable[[PyTree], PyTree]
    update_aux: Callable[[PyTree, PyTree, dict], PyTree] | None = None


@runtime_checkable
class MetricsELBO(Protocol):
    """An ELBO-like object that reports metrics: the protocol objective wrappers implement.

    ``loss_with_metrics`` takes the arguments of NumPyro's ``ELBO.loss`` and returns NumPyro's
    ``ELBO.loss_with_mutable_state`` dict extended by metrics::

        {"loss": scalar, "metrics": {name: scalar}, "mutable_state": dict | None}

    (``"mutable_state"`` may be left out when the model has no ``numpyro.mutable`` sites; a
    wrapper around a NumPyro ELBO forwards what its ``loss_with_mutable_state`` returned).
    ``metrics`` may contain ``"elbo"``: the wrapper's own ELBO estimate when its loss is not
    the negative ELBO (KL balancing, free nats); otherwise ``elbo = -loss`` is reported.

    A wrapper with state of its own (e.g. a Lagrange multiplier) also defines

    - ``init_aux() -> pytree``: its initial state; when present, ``loss_with_metrics`` is
      called with that state as the keyword argument ``aux=``;
    - ``update_aux(aux, metrics) -> aux`` (optional): its update after each optimizer step,
      given the step's metrics.

    It may read ``can_infer_discrete`` / ``multi_sample_guide`` attributes as NumPyro's
    ``SVI.init`` does on any ELBO; subclassing ``numpyro.infer.elbo.ELBO`` provides them.
    """

    def loss_with_metrics(
        self, rng_key: jax.Array, param_map: dict, model: Callable, guide: Callable, *args, **kwargs
    ) -> dict: ...


class ELBOAux(NamedTuple):
    """Non-gradient state of an :func:`elbo_objective`.

    Attributes:
        mutable_state: values of the model's and guide's ``numpyro.mutable`` sites (``{}`` if
            none), fed back through the parameter map exactly as ``numpyro.infer.SVI`` does.
        elbo_state: the :class:`MetricsELBO` wrapper's own state from ``init_aux`` (``()`` if
            none).
    """

    mutable_state: dict
    elbo_state: PyTree


def elbo_objective(model: Callable, guide: Callable, elbo: Any, **static_kwargs) -> Objective:
    """Objective ``-ELBO`` for a NumPyro model and guide.

    Parameters are initialised by ``numpyro.infer.SVI.init`` itself (``numpyro.param`` initial
    values, constraints, ``numpyro.mutable`` sites), so the objective behaves as ``SVI`` does.

    Args:
        model: NumPyro model, called as ``model(**batch, **static_kwargs)``.
        guide: NumPyro guide with the model's signature.
        elbo: any NumPyro ELBO (``Trace_ELBO``, ``TraceMeanField_ELBO(num_particles=...)``, ...)
            or a :class:`MetricsELBO` wrapper.
        **static_kwargs: keyword arguments for model and guide that are not data (constant
            through training, e.g. the data-set size for minibatch scaling).

    The loop hands the model a minibatch of ``B`` of the ``N`` sequences; for an unbiased
    estimate of the full-data ELBO the model scales its likelihood by ``N / B``, e.g. with
    ``numpyro.handlers.scale(scale=N / B)`` around the observation plate (a plate's
    ``subsample_size`` also scales, but draws indices of its own that go unused).

    Returns:
        An :class:`Objective` whose ``batch`` is a dict of keyword arguments for model and guide
        (e.g. ``{"obs": (B, T, p), "actions": (B, T, u)}``), whose metrics contain ``"loss"``,
        ``"elbo"`` and any reported by a :class:`MetricsELBO`, and whose ``aux`` is an
        :class:`ELBOAux`. ``constrain`` is available after ``init`` has run once (``fit`` runs
        it, also when resuming).
    """
    svi = SVI(model, guide, optax.identity(), elbo, **static_kwargs)
    reports_metrics = hasattr(elbo, "loss_with_metrics")
    has_state = reports_metrics and hasattr(elbo, "init_aux")

    def init(key, batch):
        svi_state = svi.init(key, **batch)
        params = svi.optim.get_params(svi_state.optim_state)
        elbo_state = elbo.init_aux() if has_state else ()
        return params, ELBOAux(svi_state.mutable_state or {}, elbo_state)

    def constrain(params):
        if svi.constrain_fn is None:
            raise RuntimeError("elbo_objective: call `init` once before `constrain`.")
        return svi.constrain_fn(params)

    def loss(params, aux, key, batch):
        param_map = dict(constrain(params))
        param_map.update(jax.lax.stop_gradient(aux.mutable_state))
        kwargs = {**batch, **static_kwargs}
        metrics = {}
        new_mutable = None
        if reports_metrics:
            extra = {"aux": aux.elbo_state} if has_state else {}
            out = elbo.loss_with_metrics(key, param_map, model, guide, **kwargs, **extra)
            value, metrics = out["loss"], dict(out["metrics"])
            new_mutable = out.get("mutable_state")
        elif aux.mutable_state:
            out = elbo.loss_with_mutable_state(key, param_map, model, guide, **kwargs)
            value, new_mutable = out["loss"], out["mutable_state"]
        else:
            value = elbo.loss(key, param_map, model, guide, **kwargs)
        if aux.mutable_state and new_mutable is not None:
            aux = aux._replace(mutable_state=jax.lax.stop_gradient(new_mutable))
        return value, {"loss": value, "elbo": -value, **metrics}, aux

    update_aux = None
    if has_state and hasattr(elbo, "update_aux"):

        def update_aux(aux, params, metrics):
            return aux._replace(elbo_state=elbo.update_aux(aux.elbo_state, metrics))

    return Objective(init=init, loss=loss, constrain=constrain, update_aux=update_aux)


def cache_per_objective(maxsize: int) -> Callable[[Callable], Callable]:
    """Decorator: ``functools.lru_cache`` for builders of compiled functions keyed by an
    objective (and other arguments), so that one objective compiles once; a call with an
    unhashable argument (an objective holding a dict, say) builds without the cache."""

    def wrap(build: Callable) -> Callable:
        cached = functools.lru_cache(maxsize=maxsize)(build)

        @functools.wraps(build)
        def call(*args):
            try:
                hash(args)
            except TypeError:  # unhashable: build afresh
                return build(*args)
            return cached(*args)

        call.cache_clear = cached.cache_clear
        call.cache_info = cached.cache_info
        return call

    return wrap
