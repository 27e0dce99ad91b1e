"""What inference may read of a model: the protocols guides, objectives, training and
:mod:`inference.compare` rely on (re-exported by :mod:`pssm.core`, where to look them up).

A model is a NumPyro program (a plain function); a family's builder attaches the attributes
below to it. ``inference`` knows a model only through these declarations: a guide or objective
that needs one checks it with :func:`require` (a ``TypeError`` naming what is missing), and one
that merely *uses more when offered* branches on ``isinstance(model, Protocol)`` (all are
``runtime_checkable``: membership is "carries every attribute", signatures are the docstrings'
contract, not checked). Nothing else of a model is visible to inference, and no model module is
imported by it.

Which family needs what (also in the README, "What each guide needs of a model"):

* ``inference.guides.kalman_smoothing``, ``backward_sampling``, ``closed_form_filtering``:
  :class:`LinearGaussian`;
* ``inference.guides.auxiliary``: :class:`AuxiliaryVariables`, and :class:`AuxiliarySizes`
  for its default encoder; ``inference.guides.ekvae_guide``: :class:`FlatAuxiliary`;
* ``inference.guides.filtering``, ``smoothing_rssm``: the latent sites ``"z_0"``, ``"z"``
  only; they use :class:`DeterministicPath`, :class:`Dimensions` and :class:`Preprocessed`
  when offered (``guide.belief_posterior`` needs :class:`Dimensions`);
* ``inference.objectives.EKVAEBound``: :class:`AuxiliaryBound`;
  ``inference.objectives.KalMambaELBO``: :class:`Regularised`;
* ``inference.compare``: :class:`ExactLikelihood` when offered (the exact ``log p(o)``);
* acting (``rl``): ``belief_step()`` returning a :class:`pssm.belief.BeliefStep`.
"""

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from jax import Array

if TYPE_CHECKING:
    from .core import Structure
    from .vhp import VHP

__all__ = [
    "AuxiliaryBound",
    "AuxiliarySizes",
    "AuxiliaryVariables",
    "DeterministicPath",
    "Dimensions",
    "ExactLikelihood",
    "FlatAuxiliary",
    "LinearGaussian",
    "Preprocessed",
    "Regularised",
    "members",
    "missing",
    "require",
]


@runtime_checkable
class LinearGaussian(Protocol):
    """The latent path admits closed-form (Kalman) inference (VRKN Sec. 3; attach with
    :func:`pssm.core.linear_gaussian`).

    ``structure(obs, actions=None, mask=None, ...)`` takes the model's arguments and returns
    the latent LGSSM of the batch, :class:`pssm.core.Structure` ``(prior N(m0, P0), dynamics
    (A_t, b_t, Q_t), emissions (H, w_t, R_t, mask_t))`` with a leading batch axis, creating its
    parameters under the model's own site names (so a guide calling it shares them).
    """

    def structure(self, *args: Any, **kwargs: Any) -> "Structure": ...


@runtime_checkable
class ExactLikelihood(Protocol):
    """The model offers its exact marginal likelihood ``log p(obs)`` per sequence.

    ``exact_log_likelihood(params, obs, actions=None, mask=None)`` -> ``(B,)``, with the
    model's parameters substituted from ``params`` (constrained values). Offered by
    ``linear_gaussian(exact=True)`` models (the Kalman likelihood of their structure) and by
    :func:`pssm.auxiliary.auxiliary_lgssm` with the linear decoder (``a`` integrated out).
    """

    def exact_log_likelihood(self, params: dict, *args: Any, **kwargs: Any) -> Array: ...


@runtime_checkable
class AuxiliaryVariables(LinearGaussian, Protocol):
    """A latent LGSSM observed through auxiliary variables ``a_t`` (KVAE / EKVAE; Klushyn et
    al. 2021, Eqs. 11-13): ``q(a, z | o) = prod_t q(a_t | o_t) p(z | a)``.

    ``structure(a, actions, mask)`` is the latent LGSSM whose emissions are ``a`` ``(B, T,
    p_a)``; ``auxiliary_site`` names the model's sample site of ``a``: a ``(B, T, p_a)`` value
    inside ``numpyro.plate("batch", B)`` with event shape ``(T, p_a)``, masked like the
    observations.
    """

    auxiliary_site: str


@runtime_checkable
class AuxiliarySizes(Protocol):
    """``auxiliary_dim`` (``p_a``) and ``obs_dim`` (``p``, flattened observations): the sizes
    of a default encoder ``q(a_t | o_t)``."""

    auxiliary_dim: int
    obs_dim: int


@runtime_checkable
class FlatAuxiliary(AuxiliaryVariables, AuxiliarySizes, Protocol):
    """An auxiliary-variable model over flat observation vectors whose ``z_0`` prior may be a
    VHP (:func:`pssm.ekvae.ekvae`).

    ``flatten(obs, mask=None)`` -> ``(x (B, T, p), observed (B, T))``: the observations as
    one array (modalities concatenated) and the per-step mask; ``vhp``: the
    :class:`pssm.vhp.VHP` of ``z_0`` (its networks registered as ``"vhp_prior"``,
    ``"vhp_posterior"``; the model samples site ``"zeta"``) or ``None``.
    """

    vhp: "VHP | None"

    def flatten(self, obs: Any, mask: Any = None) -> tuple[Array, Array]: ...


@runtime_checkable
class AuxiliaryBound(Protocol):
    """A model that computes its own bound ``L(a) <= log p(a)`` at an auxiliary sample
    (EKVAE, Latent Matters Eqs. 15-18).

    ``bound(key, a, obs, actions=None, mask=None, rewards=None, *, posterior, analytic,
    prior_bound)`` -> ``{"distortion", "reward_nll", "log_p_a", "initial", "transition",
    "posterior_kl"}`` summed over the batch (inside a parameter context); ``prior_bound(key,
    prior, posterior, z_0) <= log p(z_0)`` is the objective's estimator for a hierarchical prior
    (ignored otherwise). ``auxiliary_site`` as in :class:`AuxiliaryVariables`.
    """

    auxiliary_site: str

    def bound(self, key: Array, a: Array, *args: Any, **kwargs: Any) -> dict: ...


@runtime_checkable
class DeterministicPath(Protocol):
    """An RSSM-style deterministic path ``h_t = f(h_{t-1}, z_{t-1}, a_{t-1})`` (Hafner et al.
    2019, Eq. 1), which amortised guides recompute from their own samples.

    ``deterministic()`` registers the cell and returns ``step(h (B, s), z (B, d), a (B, u), *,
    noise=None) -> h``; ``deterministic_size`` is ``s``; ``dropout_noise(B, T)`` draws the
    model's MC-dropout site (inside a seeded context) and returns an object whose ``path``
    ``(B, T, n)`` is the cell's noise (entry 0 unused), or ``None`` without dropout.
    """

    deterministic_size: int

    def deterministic(self) -> Callable[..., Array]: ...

    def dropout_noise(self, B: int, T: int) -> Any: ...


@runtime_checkable
class Dimensions(Protocol):
    """The sizes of a model's data and state.

    ``obs_dims``: ``{modality: shape}`` in mask order (a shape is an int ``p`` or a tuple such
    as ``(H, W, C)``; :func:`pssm.inputs.modalities`; one array is ``{"obs": shape}``);
    ``action_dim``: ``u`` (0: no actions); ``latent_dim``: the size of ``z_t``.
    """

    obs_dims: Mapping[str, Any]
    action_dim: int
    latent_dim: int


@runtime_checkable
class Preprocessed(Protocol):
    """``preprocess(obs) -> obs``: what the model does to its data before scoring it (e.g.
    integer images to floats), so that a guide sees the data as the model does."""

    def preprocess(self, obs: Any) -> Any: ...


@runtime_checkable
class Regularised(Protocol):
    """A model with an auxiliary training penalty (KalMamba's Mahalanobis regulariser, Becker
    et al. 2024, Eq. 2): ``regulariser(obs, actions=None, mask=None, *, detach=..., ...)`` ->
    ``(B,)`` per sequence, under the caller's parameter (and seed) context."""

    def regulariser(self, *args: Any, **kwargs: Any) -> Array: ...


@runtime_checkable
class ActingModel(Protocol):
    """A model that can act (:mod:`pssm.belief`): ``belief_step(**options)`` registers its
    networks under the caller's parameters and returns a :class:`pssm.belief.BeliefStep`;
    ``feature_size`` is the size of its features, ``action_dim`` of its actions. What
    ``rl.world_model.belief_world_model`` needs to derive a world model."""

    feature_size: int
    action_dim: int

    def belief_step(self, **options: Any) -> Any: ...


def members(protocol: type) -> tuple[str, ...]:
    """The attributes a protocol declares (its own and its bases'), in declaration order."""
    names: list[str] = []
    for base in reversed(protocol.__mro__):
        if not getattr(base, "_is_protocol", False) or base is Protocol:
            continue
        for name in (*base.__dict__.get("__annotations__", {}), *base.__dict__):
            if not name.startswith("_") and name not in names:
                names.append(name)
    return tuple(names)


def missing(model: Any, protocol: type) -> list[str]:
    """The declared attributes ``model`` does not carry (``[]``: it follows ``protocol``); a
    declared method set to ``None`` counts as missing, as for ``isinstance``."""
    methods = {m for m in members(protocol) if callable(getattr(protocol, m, None))}
    return [
        m
        for m in members(protocol)
        if not hasattr(model, m) or (m in methods and getattr(model, m) is None)
    ]


def require(model: Any, protocol: type, user: str) -> None:
    """Raise a ``TypeError`` naming what ``model`` lacks of ``protocol``, needed by ``user``."""
    if isinstance(model, protocol):
        return
    lacks = ", ".join(f"`{m}`" for m in missing(model, protocol))
    raise TypeError(
        f"{user} needs a model carrying {lacks} (the protocol pssm.core.{protocol.__name__})"
    )
