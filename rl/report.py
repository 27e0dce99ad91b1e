"""The end-of-run report of a world model: how well it reconstructs and predicts replay."""

import json
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from inference.evaluation import save_image_grid, world_model_predict
from pssm.layers import preprocess_image

from .world_model import WorldModel, filter_sequence


def reconstruct_and_predict(wm: WorldModel, params, key, obs, actions, mask, context: int):
    """Decoded filtered beliefs of ``obs`` ``(B, T, ...)`` (reconstructions, ``T`` steps) and
    the open-loop predictions of steps ``context..T-1``: the belief after ``o_{context-1}``
    rolled forward under the recorded actions and decoded (``T - context`` steps)."""
    T = jax.tree.leaves(obs)[0].shape[1]
    beliefs = filter_sequence(wm, params, key, obs, actions, mask)
    recon = wm.decode(params, wm.features(params, beliefs))
    start = jax.tree.map(lambda v: v[:, context - 1], beliefs)
    return recon, world_model_predict(wm)(params, key, start, actions[:, context - 1 : T - 1])


def model_report(wm: WorldModel, context_fraction: float = 0.5):
    """``report(state, replay, run_dir)``: reconstructions (decoded filtered beliefs) and
    open-loop predictions (decoded ``imagine`` rollouts under the recorded actions from the
    belief after the first half of a replayed episode window) against the truth, as
    ``model_predictions.png`` and ``model_report.json`` (per-step open-loop MSE)."""

    def report(state, replay, run_dir):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if wm.decode is None or replay.num_episodes == 0:
            return
        params = wm.objective.constrain(state.model.params)
        length = min(50, min(len(replay.episode(i)["rewards"]) for i in range(replay.num_episodes)))
        batch = replay.sample_sequences(1, length).model_batch(jnp.result_type(float))
        obs, actions, mask = batch["obs"], jnp.asarray(batch["actions"]), batch["mask"]
        c = max(1, int(length * context_fraction))
        recon, pred = reconstruct_and_predict(wm, params, jax.random.key(0), obs, actions, mask, c)
        if isinstance(obs, Mapping):  # several modalities: report the image, else the first
            name = "image" if "image" in obs else next(iter(obs))
            obs, recon, pred = obs[name], recon[name], pred[name]
        truth = np.asarray(obs, np.float64)
        if truth.ndim == 5:  # images: uint8 truth, decoded means in [-0.5, 0.5]
            truth = np.asarray(preprocess_image(jnp.asarray(obs)), np.float64)
        recon, pred = np.asarray(recon, np.float64), np.asarray(pred, np.float64)
        mse = ((pred[0] - truth[0, c:]) ** 2).reshape(length - c, -1).mean(-1)
        Path(run_dir, "model_report.json").write_text(json.dumps({
            "context": c, "open_loop_mse_per_step": mse.tolist(),
            "reconstruction_mse": float(((recon[0] - truth[0]) ** 2).mean()),
        }, indent=1))  # fmt: skip
        path = Path(run_dir, "model_predictions.png")
        if truth.ndim == 5:
            step = max(1, length // 12)
            rows = [
                truth[0, ::step] + 0.5,
                recon[0, ::step] + 0.5,
                np.concatenate([np.full_like(truth[0, :c], np.nan), pred[0]])[::step] + 0.5,
            ]
            save_image_grid(path, rows, ["truth", "filtered", "open loop"])  # fmt: skip
            return
        dims = min(4, truth.shape[-1])
        fig, axes = plt.subplots(dims, 1, figsize=(6, 1.6 * dims), squeeze=False)
        t = np.arange(length)
        for i in range(dims):
            ax = axes[i, 0]
            ax.plot(t, truth[0, :, i], "k-", lw=1, label="observed")
            ax.plot(t, recon[0, :, i], "C0--", lw=1, label="filtered, decoded")
            ax.plot(t[c:], pred[0, :, i], "C1-", lw=1, label="open loop")
            ax.axvline(c - 0.5, color="grey", lw=0.5)
        axes[0, 0].legend(fontsize=7, loc="best")
        axes[-1, 0].set_xlabel("agent step")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return report
