"""Videos of evaluation episodes, written by :mod:`rl.runner` at each evaluation.

What a frame shows depends on what the run sees:

* from pixels, with a world model that decodes: ``observation | reconstruction | open-loop
  prediction`` side by side. The reconstruction decodes the filtered belief of each step; the
  prediction rolls the belief after the first half of the episode forward under the recorded
  actions without observations (grey before it starts), as ``model_predictions.png`` does;
* from pixels otherwise: the observation;
* from states: the camera view rendered at each step, when rendering works (MuJoCo headless
  with ``MUJOCO_GL=egl``); otherwise no video, and the reason is returned for the run's log.
  Rendering is the cost of these videos: about 50 ms a 64x64 frame with software OpenGL on
  CPU, so 6 s for a cartpole episode of 125 agent steps (``pssm run --no-video`` skips it).

Videos are GIFs (``imageio`` with Pillow: nothing else to install), played at the task's
control rate.
"""

import functools
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .drivers import example_batch_fn, make_world_model
from .replay import Replay
from .report import reconstruct_and_predict


def to_uint8(image) -> np.ndarray:
    """Decoded image means in ``[-0.5, 0.5]`` (the models' convention) to ``uint8``."""
    return np.clip((np.asarray(image, np.float64) + 0.5) * 255.0, 0, 255).round().astype(np.uint8)


def model_panels(cfg, env):
    """``panels(state, obs, actions, mask) -> (reconstruction, prediction)`` uint8 frames of
    one episode for ``cfg``'s world model, or ``None`` when the run has no model decoding
    images (the model is built again from ``cfg``; its parameters come from the state)."""
    if cfg.agent in ("random", "sac") or not has_images(env):
        return None
    wm = make_world_model(cfg, env)
    if wm.decode is None:
        return None
    # `constrain` needs `init` to have run once: traced only, nothing is computed or compiled
    jax.eval_shape(wm.objective.init, jax.random.key(0), example_batch_fn(env)(1, 2))

    @functools.partial(jax.jit, static_argnames="context")
    def decode(params, key, obs, actions, mask, context):
        recon, pred = reconstruct_and_predict(wm, params, key, obs, actions, mask, context)
        pick = (lambda x: x["image"]) if isinstance(recon, Mapping) else (lambda x: x)
        return pick(recon)[0], pick(pred)[0]

    def panels(state, obs, actions, mask):
        params = wm.objective.constrain(state.model.params)
        batch = jax.tree.map(lambda x: jnp.asarray(x)[None], (obs, actions, mask))
        dtype = jnp.result_type(float)
        obs_b = jax.tree.map(lambda x: x if x.dtype == jnp.uint8 else x.astype(dtype), batch[0])
        length = len(actions)
        context = max(1, length // 2)
        recon, pred = decode(params, jax.random.key(0), obs_b, batch[1].astype(dtype),
                             batch[2], context=context)  # fmt: skip
        pred = np.asarray(pred)
        grey = np.zeros((context, *pred.shape[1:]))
        return to_uint8(recon), to_uint8(np.concatenate([grey, pred]))

    return panels


def has_images(env) -> bool:
    """Whether ``env``'s observations hold an image."""
    return "image" in env.unwrapped.modalities


def record_episode(env, policy, play, *, state=None, panels=None):
    """Play one episode with ``play(env, policy, replay=...)`` and return ``(return, frames,
    note)``: ``frames`` ``(T, H, W', 3)`` uint8 (module docstring), or ``None`` with ``note``
    saying why there is no video."""
    rows = Replay(10**7)
    rendered, note = [], None
    pixels = has_images(env)

    def watched(t, obs, mask, first):
        nonlocal note
        if not pixels and note is None:
            try:
                rendered.append(np.asarray(env.unwrapped.render(), np.uint8))
            except Exception as e:  # no OpenGL / EGL: the run goes on without a video
                note = f"no evaluation video: rendering the camera failed ({type(e).__name__}: {e})"
        return policy(t, obs, mask, first)

    ret = play(env, watched, replay=rows)
    if note is not None:
        return ret, None, note
    if not pixels:
        return ret, np.stack(rendered), None
    episode = rows.episode(0)
    obs = episode["obs"]
    images = obs["image"] if isinstance(obs, Mapping) else obs
    if panels is None:
        return ret, images, None
    recon, pred = panels(state, episode["obs"], episode["actions"], episode["mask"])
    return ret, np.concatenate([images, recon, pred], axis=2), None


def write_video(path: str | Path, frames: np.ndarray, seconds_per_frame: float) -> Path:
    """Write ``frames`` ``(T, H, W, 3)`` uint8 as an endlessly looping GIF."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    duration = max(20, int(round(1000 * seconds_per_frame)))  # milliseconds per frame
    iio.imwrite(path, list(frames), extension=".gif", duration=duration, loop=0)
    return path
