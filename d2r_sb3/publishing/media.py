"""The pictures of a published policy: a replay of a few tasks side by side, and the learning curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from d2r_sb3.envs import short_task_name
from d2r_sb3.serialization.loaded_policy import LoadedPolicy

__all__ = ["CURVE_FILE", "plot_learning_curve", "record_replay"]

CURVE_FILE = "learning_curve.png"


def record_replay(
    policy: LoadedPolicy,
    path: str | Path,
    *,
    env_kwargs: dict[str, Any] | None = None,
    tasks: int | list[str] = 3,
    n_steps: int | None = None,
    size: int = 256,
    frame_skip: int = 1,
    fps: int = 30,
    camera_name: str | None = None,
) -> Path:
    """Render the policy acting on a few tasks side by side (deterministic actions) into an mp4 or a GIF.

    :param policy: the loaded policy.
    :param path: output file; ``.mp4`` (h264 via imageio-ffmpeg) or ``.gif``.
    :param env_kwargs: make_mt_env kwargs (default: the policy's).
    :param tasks: how many tasks (the first ones) or their names.
    :param n_steps: env steps to record (default: one episode).
    :param size: frame height and width of each task, in pixels.
    :param frame_skip: keep every ``frame_skip``-th frame (smaller GIFs).
    :param fps: frames per second of the output.
    :param camera_name: Meta-World camera (``None``: the env's default view, upright; the ``corner`` cameras
        render upside down with Meta-World 3 on mujoco 3).
    :return: ``path``.
    """
    import imageio.v2 as imageio  # (the zoo extra: only publishing needs it)

    path = Path(path)
    kwargs = dict(env_kwargs if env_kwargs is not None else policy.env_kwargs)
    kwargs.update(render_mode="rgb_array", width=size, height=size, camera_name=camera_name, vec_env="dummy")
    env = policy.make_env(**kwargs)
    try:
        names = env.task_names[:tasks] if isinstance(tasks, int) else tasks
        indices = [env.task_index(name) for name in names]
        n_steps = n_steps or int(env.max_episode_steps)
        frames: list[ArrayLike] = []  # (imageio's type for the frames of mimsave)
        obs = env.reset()
        for step in range(n_steps):
            if step % frame_skip == 0:
                frames.append(_side_by_side(env, indices))
            actions, _ = policy.predict(obs, deterministic=True)
            obs, *_ = env.step(actions)
    finally:
        env.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        imageio.mimsave(path, frames, duration=1000 * frame_skip / fps, loop=0)
    else:
        imageio.mimsave(path, frames, fps=max(1, fps // frame_skip), macro_block_size=16)
    return path


def _side_by_side(env: Any, indices: list[int]) -> np.ndarray:
    """One frame: the current view of each task in ``indices``, labelled with its name, left to right."""
    from PIL import Image, ImageDraw

    tiles = []
    for index in indices:
        tile = Image.fromarray(np.ascontiguousarray(env.env_method("render", indices=[index])[0]))
        ImageDraw.Draw(tile).text((4, 4), short_task_name(env.task_names[index]), fill=(255, 255, 255))
        tiles.append(np.asarray(tile))
    return np.concatenate(tiles, axis=1)


def plot_learning_curve(evaluations: dict[str, Any], path: str | Path) -> Path:
    """Plot mean and per-task success rate vs env steps per task from an ``evaluations.json`` history.

    :param evaluations: the history written by :class:`~d2r_sb3.common.callbacks.PerTaskEvalCallback`.
    :param path: output PNG.
    :return: ``path``.
    """
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend and figures alone

    steps = evaluations.get("timesteps_per_task") or evaluations["timesteps"]
    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.subplots()
    # dtype=float turns unknown values (None, in a rebuilt history) into NaN: gaps in the lines.
    for values in (evaluations.get("success") or {}).values():
        ax.plot(steps, np.asarray(values, dtype=float), lw=0.8, alpha=0.35)
    ax.plot(
        steps,
        np.asarray(evaluations["mean_success"], dtype=float),
        lw=2.2,
        color="black",
        label="mean over tasks",
    )
    ax.set_xlabel("env steps per task" if evaluations.get("timesteps_per_task") else "env steps")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title(
        f"{evaluations.get('n_eval_episodes', '?')} deterministic episodes per task (thin: each task)"
    )
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
