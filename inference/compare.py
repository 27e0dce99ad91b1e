"""Generic comparison of guide families and ELBOs on one model: train (or only evaluate) every
(guide, ELBO) pair from the same initial parameters and data, and tabulate

    ELBO        L = E_q[log p(o, z) - log q(z | o)]            (mean +- s.e. over particles)
    log p(o)    exact, where the model has one (Kalman)        (mean +- s.e. over sequences)
    split       L = E_q[log p(o | z)] - E_q[log q(z | o) - log p(z)] = recon - KL
    parameters  the learned (constrained) values, and their distance to the truth if given

all per sequence (divided by the number of evaluation sequences). The KL term is the Monte
Carlo log-ratio under ``Trace_ELBO`` and the per-site analytic KL where NumPyro has one under
``TraceMeanField_ELBO``, exactly as each ELBO scores it, so ``recon - KL`` equals the ELBO
estimate of the same particle. This is the experiment of the VRKN paper's Figure 2 (Becker &
Neumann, 2022) in general form; ``examples/elbo_comparison.py`` runs that instance.

Why a model *factory*: each pair is trained separately, and a model may hold Python-side state
(an eagerly initialised network), so the clean contract is a function building a fresh model;
an already built model is accepted too (it is reused, which is equivalent for models whose
state is all in NumPyro parameter sites). Guides are given as *guide families*: callables
taking the model and returning a guide (``kalman_smoothing``, ``partial(auxiliary, ...)``,
``lambda model: my_guide``).
"""

import inspect
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.distributions.kl import kl_divergence
from numpyro.handlers import replay, seed, substitute, trace
from numpyro.infer import Trace_ELBO, TraceMeanField_ELBO

from inference import training
from pssm.core import ExactLikelihood


def log_likelihood(model: Callable, params: dict, **data) -> jax.Array | None:
    """Exact ``log p(obs)`` per sequence ``(B,)`` when the model offers one
    (:class:`pssm.core.ExactLikelihood`: ``model.exact_log_likelihood``, e.g. a model declared
    ``linear_gaussian(exact=True)`` or ``pssm.auxiliary.auxiliary_lgssm`` with its linear
    decoder), else ``None``."""
    if isinstance(model, ExactLikelihood):
        return model.exact_log_likelihood(params, **data)
    return None


def _site_log_prob(site) -> jax.Array:
    fn, value = site["fn"], site["value"]
    lp = fn.log_prob(value, site["intermediates"]) if site["intermediates"] else fn.log_prob(value)
    if site["scale"] is not None:
        lp = site["scale"] * lp
    return jnp.sum(lp)


def elbo_split(model, guide, params: dict, key: jax.Array, *, analytic_kl: bool, **data):
    """``(recon, kl)`` of one particle, with the key convention of NumPyro's ELBOs (``key``
    split into model and guide seeds), so ``recon - kl`` is that particle's ELBO.

    ``recon`` sums the log-densities of the model's observed sites; ``kl`` sums, over latent
    sites, ``log q - log p`` at the guide's sample or (``analytic_kl``, as
    ``TraceMeanField_ELBO`` does) ``KL(q || p)`` of the site's distributions where NumPyro has
    it in closed form; guide-only sites add ``log q``.
    """
    model_key, guide_key = jax.random.split(key)
    guide_tr = trace(substitute(seed(guide, guide_key), data=params)).get_trace(**data)
    model_tr = trace(substitute(replay(seed(model, model_key), guide_tr), data=params))
    model_tr = model_tr.get_trace(**data)
    recon, kl = jnp.zeros(()), jnp.zeros(())
    for name, site in model_tr.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            recon = recon + _site_log_prob(site)
            continue
        guide_site = guide_tr[name]
        term = None
        if analytic_kl:
            try:
                term = kl_divergence(guide_site["fn"], site["fn"])
                if guide_site["scale"] is not None:
                    term = guide_site["scale"] * term
                term = jnp.sum(term)
            except NotImplementedError:
                term = None
        if term is None:
            term = _site_log_prob(guide_site) - _site_log_prob(site)
        kl = kl + term
    for name, site in guide_tr.items():
        if site["type"] == "sample" and name not in model_tr and not site["is_observed"]:
            kl = kl + _site_log_prob(site)
    return recon, kl


def _elbo_value(elbo, key, params, model, guide, data):
    if hasattr(elbo, "loss"):
        return -elbo.loss(key, params, model, guide, **data)
    out = elbo.loss_with_metrics(key, params, model, guide, **data)
    return out["metrics"].get("elbo", -out["loss"])


def evaluate(
    model, guide, elbo, params: dict, data: dict, *, key: jax.Array, num_particles: int = 16
) -> dict:
    """ELBO, its recon/KL split and the exact log-likelihood, per sequence, at constrained
    ``params``; see :func:`compare` for the fields.

    Particle ``i`` uses ``k_i = jax.random.split(key, num_particles)[i]`` as NumPyro's ELBOs
    do: for ``Trace_ELBO`` and ``TraceMeanField_ELBO`` (the estimators :func:`elbo_split`
    reproduces) its ELBO is ``recon - kl`` of the same traces, which equals
    ``-elbo.loss(k_i, params, model, guide, **data)``; any other ELBO object is called
    itself, in a separate compiled call.
    """
    num = jax.tree.leaves(data)[0].shape[0]
    inner = getattr(elbo, "num_particles", 1)
    analytic = isinstance(elbo, TraceMeanField_ELBO)

    def split(params, data, key):
        keys = jax.random.split(key, inner) if inner > 1 else key[None]
        one = lambda k: elbo_split(model, guide, params, k, analytic_kl=analytic, **data)
        recon, kl = jax.vmap(one)(keys)
        return jnp.stack([recon.mean(), kl.mean()])

    # One compiled call, particles in sequence (lax.map): bounded memory, one dispatch, and a
    # single model/guide pass per particle (jaxlib 0.10's CPU LAPACK kernels can deadlock when
    # independent batched solves run concurrently, e.g. two smoothers of the same batch).
    keys = jax.random.split(key, num_particles)
    run = jax.jit(lambda p, d, ks: jax.lax.map(lambda k: split(p, d, k), ks))
    recon, kl = (np.asarray(jax.block_until_ready(run(params, data, keys))) / num).T
    if type(elbo) in (Trace_ELBO, TraceMeanField_ELBO):
        values = recon - kl
    else:
        run = jax.jit(
            lambda p, d, ks: jax.lax.map(lambda k: _elbo_value(elbo, k, p, model, guide, d), ks)
        )
        values = np.asarray(jax.block_until_ready(run(params, data, keys))) / num
    row = {
        "elbo_mean": float(values.mean()),
        "elbo_se": _se(values),
        "recon": float(recon.mean()),
        "kl": float(kl.mean()),
        "log_lik": None,
        "log_lik_se": None,
        "gap": None,
        "eval_particles": num_particles,
        "eval_sequences": num,
    }
    exact = jax.jit(lambda p, d: log_likelihood(model, p, **d))(params, data)
    if exact is not None:
        exact = np.asarray(exact)
        row.update(log_lik=float(exact.mean()), log_lik_se=_se(exact))
        row["gap"] = row["log_lik"] - row["elbo_mean"]
    return row


def _se(x) -> float:
    x = np.asarray(x, dtype=float)
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def _is_factory(obj) -> bool:
    """A callable with no parameters at all builds the model; a model takes its data."""
    try:
        return len(inspect.signature(obj).parameters) == 0
    except (TypeError, ValueError):
        return False


def compare(
    model: Callable,
    guides: dict[str, Callable],
    elbos: dict[str, Any],
    data: dict,
    *,
    eval_data: dict | None = None,
    pairs: Iterable[tuple[str, str]] | None = None,
    train: bool = True,
    num_steps: int = 1000,
    batch_size: int | None = None,
    optimizer: optax.GradientTransformation | None = None,
    eval_particles: int = 16,
    key: jax.Array | None = None,
    true_params: dict | None = None,
    run_dir: str | os.PathLike | None = None,
    steps_per_call: int = 100,
    progress: bool = False,
) -> list[dict]:
    """Train or only evaluate every (guide, ELBO) pair on one model and tabulate the results.

    A pair that raises (e.g. a guide family that does not apply to the model) gets a row with
    its ``failure`` and the other pairs still run. With a ``run_dir`` every finished pair is
    stored there and a later call with the same ``run_dir`` resumes: finished pairs are read
    back, not retrained; the others are trained, continuing from their latest checkpoint.

    Args:
        model: a zero-argument factory building a fresh model (called once per pair), or a
            model (reused).
        guides: name -> guide family ``model -> guide``.
        elbos: name -> NumPyro ELBO (or a ``MetricsELBO`` wrapper) used for training and
            evaluation.
        data: keyword arguments of model and guide with a leading axis of ``N`` sequences
            (``{"obs": ..., "actions": ..., "mask": ...}``), the training set.
        eval_data: evaluation set (default: ``data``), e.g. held-out sequences.
        pairs: the ``(guide name, ELBO name)`` pairs to run (default: all combinations).
        train: fit each pair with :func:`inference.training.fit`; otherwise evaluate at the
            initial parameters (the model's own values).
        num_steps, batch_size, optimizer: training settings (defaults: ``min(N, 50)``
            sequences per step, ``optax.adam(1e-2)``). Every pair starts from the same key, so
            from the same initial parameters and the same minibatch sequence.
        eval_particles: independent ELBO estimates for the mean and standard error.
        key: PRNG key (default ``PRNGKey(0)``).
        true_params: name -> true (constrained) value; rows then hold ``error_<name>``, the
            Frobenius norm of learned minus true.
        run_dir: if given (and ``train``), each pair's metrics, checkpoints and finished row
            (``row.json``) go to ``run_dir/<guide>-<elbo>/``. A stored row is reused when its
            ``train_steps`` and ``eval_particles`` match the call (data, model and other
            settings are not checked: use a new ``run_dir`` when they change); a pair without
            one is trained with ``resume=True``, so a run stopped midway, or one given more
            ``num_steps``, continues from its latest checkpoint (one already past
            ``num_steps`` is evaluated as it is). Failed pairs are not stored: they run again.
        steps_per_call: updates per compiled call of the training loop.
        progress: show training progress bars.

    Returns:
        One dict per pair: ``guide``, ``elbo``, ``elbo_mean``, ``elbo_se``, ``recon``,
        ``kl`` (``elbo_mean == recon - kl``), ``log_lik`` / ``log_lik_se`` / ``gap``
        (``None`` without an exact likelihood), ``params`` (constrained values as lists,
        network parameters left out), ``error_<name>`` for the true parameters,
        ``train_elbo`` (mean per-sequence training ELBO of the last 10% of steps),
        ``train_steps`` (updates done), the evaluation sizes, ``failure`` (``None``, or the
        exception that stopped the pair as one line ``"<type>: <message>"``; its result
        fields are then ``None``), ``warnings`` (the distinct warnings the pair raised, one
        line each, as the active warning filters let them through) and ``seconds``. Values
        are per sequence.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    train_key, eval_key = jax.random.split(key)
    eval_data = data if eval_data is None else eval_data
    num = jax.tree.leaves(data)[0].shape[0]
    batch_size = min(num, 50) if batch_size is None else batch_size
    optimizer = optax.adam(1e-2) if optimizer is None else optimizer
    pairs = [(g, e) for g in guides for e in elbos] if pairs is None else list(pairs)

    def run_pair(guide_name, elbo_name, pair_dir):
        fresh = model() if _is_factory(model) else model
        guide = guides[guide_name](fresh)
        elbo = elbos[elbo_name]
        objective = training.elbo_objective(fresh, guide, elbo)
        if train:
            state, history = training.fit(
                objective,
                data,
                optimizer,
                num_steps=num_steps,
                batch_size=batch_size,
                key=train_key,
                run_dir=pair_dir,
                resume=pair_dir is not None,
                steps_per_call=steps_per_call,
                progress=progress,
            )
            raw = state.params
            tail = history[-max(1, len(history) // 10) :]
            row = {
                "train_steps": int(state.step),
                "train_elbo": float(np.mean([r["elbo"] for r in tail])) / batch_size
                if tail
                else None,
            }
        else:
            init_key, _ = jax.random.split(train_key)  # as training.fit initialises
            first = jax.tree.map(lambda x: x[:batch_size], data)
            # compiled: same values as fit's eager init, without running model and guide op by
            # op (the initial values do not depend on the traced computation's results)
            raw, _ = jax.jit(objective.init)(init_key, first)
            row = {"train_steps": 0, "train_elbo": None}
        values = objective.constrain(raw)
        row.update(
            evaluate(
                fresh, guide, elbo, values, eval_data, key=eval_key, num_particles=eval_particles
            )
        )
        row["params"] = {k: np.asarray(v).tolist() for k, v in values.items() if "$" not in k}
        for name, truth in (true_params or {}).items():
            if name in values:
                diff = np.asarray(values[name]) - np.asarray(truth)
                row[f"error_{name}"] = float(np.sqrt(np.sum(diff**2)))
        return row

    expected = {"train_steps": num_steps, "eval_particles": eval_particles}
    rows = []
    for guide_name, elbo_name in pairs:
        pair_dir = (
            None if run_dir is None or not train else Path(run_dir) / f"{guide_name}-{elbo_name}"
        )
        row = None if pair_dir is None else _stored_row(pair_dir, expected)
        if row is None:
            result = _recorded(run_pair, guide_name, elbo_name, pair_dir)
            row = {"guide": guide_name, "elbo": elbo_name, **result}
            if pair_dir is not None and row["failure"] is None:
                _store_row(pair_dir, row)
        rows.append(row)
    return rows


ROW_FILE = "row.json"

# the result fields of a row, ``None`` in the row of a pair that failed
_RESULTS = (
    "train_steps",
    "train_elbo",
    "elbo_mean",
    "elbo_se",
    "recon",
    "kl",
    "log_lik",
    "log_lik_se",
    "gap",
    "eval_particles",
    "eval_sequences",
)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _recorded(run: Callable[..., dict], *args) -> dict:
    """``run(*args)``'s result fields with ``failure`` (``None``, or the exception it raised as
    ``"<type>: <message>"``), ``warnings`` (distinct, in order of first appearance, one line
    each) and ``seconds``."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # also resets "default" de-duplication
        try:
            row, failure = run(*args), None
        except Exception as error:  # a failing pair is a row of the table, not the end of it
            row = {**dict.fromkeys(_RESULTS), "params": {}}
            failure = _one_line(f"{type(error).__name__}: {error}")
    seen = (_one_line(f"{w.category.__name__}: {w.message}") for w in caught)
    row.update(
        failure=failure, warnings=list(dict.fromkeys(seen)), seconds=time.perf_counter() - start
    )
    return row


def _stored_row(pair_dir: Path, expected: dict) -> dict | None:
    """The finished row stored in ``pair_dir`` if its settings are ``expected``, else ``None``."""
    path = pair_dir / ROW_FILE
    if not path.exists():
        return None
    row = json.loads(path.read_text())
    return row if all(row.get(k) == v for k, v in expected.items()) else None


def _store_row(pair_dir: Path, row: dict) -> None:
    """Write ``pair_dir/row.json`` whole or not at all (a partial file would read as finished)."""
    pair_dir.mkdir(parents=True, exist_ok=True)
    partial = pair_dir / (ROW_FILE + ".partial")
    partial.write_text(json.dumps(row, indent=2))
    os.replace(partial, pair_dir / ROW_FILE)


def _fmt(x, se=None) -> str:
    if x is None:
        return "–"
    if isinstance(x, list):
        return "[" + ", ".join(_fmt(v) for v in np.ravel(x)) + "]"
    text = f"{x:.4g}"
    return text if se is None else f"{text} ± {se:.2g}"


def markdown_table(rows: list[dict], params: Iterable[str] | None = None) -> str:
    """The rows as a Markdown table: ELBO +- s.e., exact log-likelihood, gap, recon, KL, learned
    parameters (``params``: names to show; default every parameter with at most 4 entries),
    the ``error_<name>`` columns and, when some pair failed or warned, a ``notes`` column with
    its failure and warnings."""
    if params is None:
        params = sorted({k for r in rows for k, v in r["params"].items() if np.size(v) <= 4})
    params = list(params)
    errors = sorted({k for r in rows for k in r if k.startswith("error_")})
    header = ["guide", "ELBO", "ELBO / seq", "log p(o) / seq", "gap", "recon", "KL"]
    header += params + [f"‖{e[6:]} − true‖_F" for e in errors]
    notes = [_notes(r) for r in rows]
    if any(notes):
        header.append("notes")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r, note in zip(rows, notes, strict=True):
        cells = [
            r["guide"],
            r["elbo"],
            _fmt(r["elbo_mean"], r["elbo_se"]),
            _fmt(r["log_lik"], r["log_lik_se"]),
            _fmt(r["gap"]),
            _fmt(r["recon"]),
            _fmt(r["kl"]),
        ]
        cells += [_fmt(r["params"].get(p)) for p in params]
        cells += [_fmt(r.get(e)) for e in errors]
        cells += [note] if any(notes) else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _notes(row: dict) -> str:
    """A row's failure and warnings as one table cell (``|`` escaped)."""
    notes = [f"failed: {row['failure']}"] if row.get("failure") else []
    notes += [f"warning: {w}" for w in row.get("warnings") or []]
    return "; ".join(notes).replace("|", "\\|")


def save(rows: list[dict], out_dir: str | os.PathLike, name: str = "comparison", **table) -> Path:
    """Write ``out_dir/<name>.json`` (the rows) and ``out_dir/<name>.md`` (the table)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2))
    (out / f"{name}.md").write_text(markdown_table(rows, **table) + "\n")
    return out


def plot(rows: list[dict], path: str | os.PathLike, true_params: dict | None = None) -> Path:
    """Bar charts: per-sequence ELBO +- s.e. with the exact log-likelihood marked, then for
    each true parameter the learned value against the truth (scalars) or the Frobenius error
    (arrays). Pairs that failed are left out."""
    from matplotlib.figure import Figure

    true_params = true_params or {}
    rows = [r for r in rows if not r.get("failure")]
    labels = [f"{r['guide']}\n{r['elbo']}" for r in rows]
    x = np.arange(len(rows))
    fig = Figure(figsize=(4 * (1 + len(true_params)), 3.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, 1 + len(true_params)))
    ax = axes[0]
    ax.bar(
        x,
        [r["elbo_mean"] for r in rows],
        yerr=[r["elbo_se"] for r in rows],
        capsize=4,
        color="C0",
        label="ELBO",
    )
    exact = [(i, r["log_lik"]) for i, r in enumerate(rows) if r["log_lik"] is not None]
    if exact:
        ax.scatter(*zip(*exact, strict=True), marker="_", s=600, color="k", label="log p(o)")
    ax.set(title="per-sequence ELBO", xticks=x, xticklabels=labels)
    ax.legend()
    for ax, (name, truth) in zip(axes[1:], true_params.items(), strict=True):
        if np.size(truth) == 1:
            ax.bar(x, [float(np.ravel(r["params"][name])[0]) for r in rows], color="C1")
            ax.axhline(float(np.ravel(truth)[0]), color="k", ls="--", label="true")
            ax.set(title=f"learned {name}")
            ax.legend()
        else:
            ax.bar(x, [r[f"error_{name}"] for r in rows], color="C2")
            ax.set(title=f"‖{name} − {name}_true‖_F")
        ax.set(xticks=x, xticklabels=labels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
