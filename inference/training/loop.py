"""The training loop: minibatch stochastic gradient descent on an :class:`Objective` with optax.

Step ``k = 0, 1, ...`` (the ``k+1``-th update) draws its randomness from
``key_k = fold_in(state.key, k)``: a minibatch of ``batch_size`` distinct sequences out of the
``N`` in ``data``, and the key of the loss (e.g. the ELBO's reparameterised samples). Then

    (loss_k, metrics_k, aux'), g_k = value_and_grad(loss)(params_k, aux_k, key_k, batch_k)
    params_{k+1}, opt_state_{k+1} = optax update of (params_k, opt_state_k) with g_k
    aux_{k+1} = update_aux(aux', params_{k+1}, metrics_k)

Since every step's randomness depends only on ``(state.key, k)``, a run does not depend on how
its steps are grouped into compiled calls (``steps_per_call``) or split by checkpoint + resume:
on CPU the parameters agree bit for bit. With several visible devices each minibatch is
sharded over a 1-D mesh axis ``"batch"`` and the state replicated (data parallelism; GSPMD
inserts the gradient all-reduce), which changes results only by floating-point reassociation.
"""

import functools
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from . import checkpoint
from .objective import Objective, cache_per_objective

PyTree = Any
#: names inside ``run_dir``
CHECKPOINTS, METRICS = "checkpoints", "metrics.jsonl"


class TrainState(NamedTuple):
    """Everything a run needs to continue exactly.

    Attributes:
        params: unconstrained trainable parameters.
        opt_state: the optax optimizer state.
        aux: the objective's non-gradient state.
        key: base PRNG key of the run; step ``k`` uses ``fold_in(key, k)``.
        step: number of updates done (int32 scalar).
    """

    params: PyTree
    opt_state: PyTree
    aux: PyTree
    key: jax.Array
    step: jax.Array


class NonFiniteLossError(FloatingPointError):
    """Raised by :func:`fit` when a step's loss or gradient is not finite.

    Attributes:
        step: the failing update (1-based, as in the metric records).
        metrics: the failing step's metrics.
        last_metrics: metrics of the last finite step (``None`` if there is none).
        state: the last finite :class:`TrainState` (after ``step - 1`` updates), the one the
            failing step started from; also checkpointed when ``fit`` has a ``run_dir``.
    """

    def __init__(self, message, step, metrics, last_metrics, state):
        super().__init__(message)
        self.step, self.metrics, self.last_metrics, self.state = step, metrics, last_metrics, state


def init_train_state(
    objective: Objective, optimizer: optax.GradientTransformation, key: jax.Array, batch: PyTree
) -> TrainState:
    """Initial state: ``objective.init`` on ``batch`` with one half of ``key``, the other half
    becoming the run's base key."""
    init_key, run_key = jax.random.split(key)
    params, aux = objective.init(init_key, batch)
    # strong dtypes, so that the scan carry keeps one type (as numpyro.infer.SVI.init does)
    params, aux = jax.tree.map(lambda x: _cast(x, jnp.result_type(x)), (params, aux))
    return TrainState(params, optimizer.init(params), aux, run_key, jnp.zeros((), jnp.int32))


def train_steps(
    objective: Objective,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    data: PyTree,
    num_steps: int | jax.Array,
    *,
    batch_size: int,
    max_steps: int | None = None,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> tuple[TrainState, dict]:
    """``num_steps`` updates in one compiled loop (pure; jit it or call it inside jitted code).

    Args:
        objective: the objective to minimise.
        optimizer: optax gradient transformation (given ``value=loss`` through
            ``optax.with_extra_args_support``, so e.g. plateau schedules work).
        state: the state to continue from.
        data: pytree of arrays with a common leading axis of ``N`` sequences.
        num_steps: number of updates; may be a traced integer when ``max_steps`` is given.
        batch_size: sequences per minibatch, drawn without replacement (static).
        max_steps: static bound on ``num_steps`` (default: ``num_steps``, then static), so
            one compiled function serves every ``num_steps <= max_steps``.
        batch_sharding: optional sharding constraint for each minibatch leaf.

    Returns:
        The new state and the metrics: a dict of arrays with leading axis ``max_steps``, of
        which the first ``num_steps`` rows are the updates' metrics (the rest are zeros),
        including ``"loss"`` and ``"grad_norm"`` (global norm of the gradient).
    """
    max_steps = num_steps if max_steps is None else max_steps
    step = functools.partial(_step, objective, optimizer, data, batch_size, batch_sharding)
    _, shapes = jax.eval_shape(step, state)
    buffer = jax.tree.map(lambda s: jnp.zeros((max_steps, *s.shape), s.dtype), shapes)

    def body(i, carry):
        state, buffer = carry
        state, metrics = step(state)
        return state, jax.tree.map(lambda b, m: b.at[i].set(m), buffer, metrics)

    return jax.lax.fori_loop(0, num_steps, body, (state, buffer))


def _step(objective, optimizer, data, batch_size, batch_sharding, state):
    num_data = jax.tree.leaves(data)[0].shape[0]
    batch_key, loss_key = jax.random.split(jax.random.fold_in(state.key, state.step))
    index = jax.random.choice(batch_key, num_data, (batch_size,), replace=False)
    batch = jax.tree.map(lambda x: jnp.take(x, index, axis=0), data)
    if batch_sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)

    def loss_fn(params):
        loss, metrics, aux = objective.loss(params, state.aux, loss_key, batch)
        return loss, (metrics, aux)

    (loss, (metrics, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    update = optax.with_extra_args_support(optimizer).update
    updates, opt_state = update(grads, state.opt_state, state.params, value=loss)
    params = optax.apply_updates(state.params, updates)
    if objective.update_aux is not None:
        aux = objective.update_aux(aux, params, metrics)
    aux = jax.tree.map(lambda new, old: _cast(new, old.dtype), aux, state.aux)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    return TrainState(params, opt_state, aux, state.key, state.step + 1), metrics


def _cast(x, dtype):
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return x
    return jax.lax.convert_element_type(x, dtype)


@cache_per_objective(maxsize=32)
def _compiled_steps(objective, optimizer, batch_size, max_steps, mesh):
    sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec("batch"))
    run = functools.partial(
        train_steps, objective, optimizer, batch_size=batch_size, max_steps=max_steps,
        batch_sharding=sharding,
    )  # fmt: skip
    return jax.jit(run)


def fit(
    objective: Objective,
    data: PyTree,
    optimizer: optax.GradientTransformation,
    *,
    num_steps: int,
    batch_size: int,
    key: jax.Array | None = None,
    steps_per_call: int = 10,
    run_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    max_to_keep: int = 3,
    resume: bool = False,
    state: TrainState | None = None,
    progress: bool = True,
    callback: Callable[[TrainState, list[dict]], bool | None] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> tuple[TrainState, list[dict]]:
    """Train ``objective`` on ``data`` until ``num_steps`` updates are done.

    Args:
        objective: e.g. :func:`~inference.training.elbo_objective` of a model and guide.
        data: pytree (e.g. dict of model keyword arguments) of arrays with a common leading
            axis of ``N`` sequences; minibatches are drawn from it inside the compiled call.
        optimizer: optax gradient transformation.
        num_steps: total number of updates of the run (a resumed or continued run stops at
            ``num_steps`` too, counting the updates already done).
        batch_size: sequences per minibatch (``<= N``; a multiple of the number of devices).
        key: PRNG key of a fresh run (initialisation and all steps); unused when ``state`` is
            given, needed to build the state structure when resuming.
        steps_per_call: most updates per compiled call (one XLA loop); results do not depend
            on it. Calls also stop at checkpoint steps and at ``num_steps``. The compiled loop
            is cached per (objective, optimizer, batch_size, steps_per_call, devices): reuse
            the same optimizer object across calls to skip recompilation.
        run_dir: directory for ``metrics.jsonl`` and ``checkpoints/<step>/``
            (:mod:`~inference.training.checkpoint`); ``None`` keeps everything in memory.
        checkpoint_every: save the state every this many updates; it is also saved at the end,
            on ``KeyboardInterrupt`` (then re-raised) and before raising
            :class:`NonFiniteLossError`. A process killed outright loses only the updates since
            the last checkpoint.
        max_to_keep: checkpoints kept (latest first).
        resume: continue from the newest intact checkpoint in ``run_dir`` when there is one
            (else start as usual); damaged newer ones are skipped with a logged reason, and
            with none intact :class:`~inference.training.checkpoint.CheckpointError` is raised
            before anything is written. Metric records after its step (and a torn final line)
            are dropped from the file, so the history has every step once. A run of ``n``
            updates equals, bit for bit on CPU, ``n/2`` updates then a resumed run to ``n``.
        state: continue from this state instead of initialising (e.g. more updates on a grown
            replay buffer); ``run_dir`` must not hold checkpoints beyond its step.
        progress: show a tqdm progress bar with the latest loss.
        callback: ``callback(state, records)`` after each compiled call with the new metric
            records; returning ``True`` stops training (the final state is checkpointed).
        devices: devices to shard each minibatch over (default: all visible devices).

    Returns:
        The final :class:`TrainState` and the metric history: one dict per update
        (``{"step": k, "loss": ..., "elbo": ..., "grad_norm": ...}``: Python numbers, lists for
        non-scalar metrics), including the records of earlier runs read back from ``run_dir``
        when resuming.

    Raises:
        ValueError: ``data`` leaves disagree on ``N``, ``batch_size`` exceeds ``N`` or is not a
            multiple of the device count, or a checkpoint does not fit the objective.
        NonFiniteLossError: the loss or gradient of some update is NaN or infinite.
        FileExistsError: ``run_dir`` holds checkpoints past the start of a run not resumed.
        CheckpointError: resuming, ``run_dir`` holds checkpoints but none is intact.
    """
    _check_data(data, batch_size)
    if resume and run_dir is None:
        raise ValueError("resume=True needs the run_dir to resume from")
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) > 1 and batch_size % len(devices):
        raise ValueError(
            f"batch_size={batch_size} must be a multiple of the {len(devices)} devices it is "
            "sharded over"
        )
    mesh = Mesh(np.array(devices), ("batch",)) if len(devices) > 1 else None
    placement = devices[0] if mesh is None else NamedSharding(mesh, PartitionSpec())
    data = jax.device_put(data, placement)  # once, not at every call; replicated over the mesh
    if state is None:
        if key is None:
            raise ValueError("fit needs `key` (or a `state` to continue from)")
        state = init_train_state(objective, optimizer, key, _first(data, batch_size))
    state = jax.device_put(state, placement)

    root, history = None, []
    if run_dir is not None:
        root = Path(run_dir) / CHECKPOINTS
        found = checkpoint.steps(root)
        if resume and found:
            state = jax.device_put(_restore_newest(root, state), placement)
        elif found and found[-1][0] > int(state.step):
            raise FileExistsError(
                f"{run_dir} holds checkpoints up to step {found[-1][0]}; pass resume=True or "
                "use another run_dir"
            )
        checkpoint.remove_temporary(root)
        history = checkpoint.read_metrics(Path(run_dir) / METRICS, int(state.step))
    save = functools.partial(_save, root, keep=max_to_keep)

    run = _compiled_steps(objective, optimizer, batch_size, steps_per_call, mesh)
    step = int(state.step)
    bar = tqdm(total=num_steps, initial=min(step, num_steps), disable=not progress)
    try:
        while step < num_steps:
            length = min(steps_per_call, num_steps - step)
            if root is not None:
                length = min(length, checkpoint_every - step % checkpoint_every)
            new_state, metrics = run(state, data, length)
            records = _records(jax.device_get(metrics), step, length)
            bad = _first_non_finite(records)
            if bad is not None:
                last = state if bad == 0 else run(state, data, bad)[0]
                _commit(history, records[:bad], run_dir)
                raise _non_finite(records[bad], history, last, root, max_to_keep)
            _commit(history, records, run_dir)
            state, step = new_state, step + length
            bar.update(length)
            bar.set_postfix(loss=f"{records[-1]['loss']:.4g}")
            if step % checkpoint_every == 0:
                save(state)
            if callback is not None and callback(state, records):
                break
        save(state)
    except KeyboardInterrupt:
        save(state)
        raise
    finally:
        bar.close()
        if root is not None:
            checkpoint.remove_temporary(root)
    return state, history


def restore(
    run_dir: str | os.PathLike, template: TrainState, step: int | None = None
) -> TrainState:
    """Load the checkpoint of ``run_dir`` at ``step`` (default: the newest intact one) into the
    structure of ``template`` (e.g. ``init_train_state`` of the same objective and optimizer).

    Raises:
        FileNotFoundError: ``run_dir`` holds no checkpoint (at ``step``).
        CheckpointError: the checkpoint (every one, without ``step``) is damaged.
        ValueError: the checkpoint does not fit ``template``.
    """
    root = Path(run_dir) / CHECKPOINTS
    if step is None:
        if not checkpoint.steps(root):
            raise FileNotFoundError(f"no checkpoint under {root}")
        return _restore_newest(root, template)
    if not (root / str(step)).is_dir():
        raise FileNotFoundError(f"no checkpoint {root / str(step)}")
    return _load(root / str(step), template)


def _load(path: Path, template: TrainState) -> TrainState:
    try:
        return checkpoint.restore(path, {"state": template})[0]["state"]
    except ValueError as error:
        raise ValueError(
            f"checkpoint {path} does not match the train state built by this objective and "
            f"optimizer (different model, guide or optimizer?): {error}"
        ) from error


def _restore_newest(root: Path, template: TrainState) -> TrainState:
    return checkpoint.restore_newest(root, lambda path: _load(path, template))[1]


def _save(root: Path | None, state: TrainState, keep: int) -> None:
    """Checkpoint ``state`` under its step unless that step is already saved intact."""
    if root is None:
        return
    path = root / str(int(state.step))
    if path.is_dir():
        try:
            checkpoint.verify(path)
            return
        except checkpoint.CheckpointError:
            pass  # a damaged leftover of an earlier attempt: write it again
    checkpoint.save(root, int(state.step), {"state": state}, keep=keep)


def _check_data(data, batch_size):
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("data holds no arrays")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        shapes = jax.tree.map(jnp.shape, data)
        raise ValueError(f"data leaves need one common leading axis (N sequences); got {shapes}")
    (num_data,) = sizes
    if not 1 <= batch_size <= num_data:
        raise ValueError(f"batch_size={batch_size} must lie in [1, N={num_data}]")
    return num_data


def _first(data, batch_size):
    return jax.tree.map(lambda x: x[:batch_size], data)


def _records(metrics, start, length):
    return [
        {"step": start + i + 1, **{name: value[i].tolist() for name, value in metrics.items()}}
        for i in range(length)
    ]


def _first_non_finite(records):
    for i, record in enumerate(records):
        if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
            return i
    return None


def _commit(history, records, run_dir):
    history.extend(records)
    if run_dir is not None and records:
        checkpoint.append_metrics(Path(run_dir) / METRICS, records)


def _non_finite(record, history, last_state, root, keep):
    where = ""
    if root is not None:
        _save(root, last_state, keep)
        where = f"; the last finite state is checkpointed under {root}"
    last = history[-1] if history and history[-1]["step"] == record["step"] - 1 else None
    message = (
        f"non-finite loss or gradient at step {record['step']}: metrics {record}; "
        f"last finite metrics {last}{where}"
    )
    return NonFiniteLossError(message, record["step"], record, last, last_state)
