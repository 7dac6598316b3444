"""Watch a multi-task policy solve one task: per-episode return and success, optional video or window.

Before playing, it prints the evaluation recorded with the policy (its ``results.json``) for the task, when there
is one, and, for a task the policy does not solve, the tasks it does.

Examples, from the repository root::

    python zoo/enjoy.py --task drawer-open                               # the bundled pretrained MT10 policy
    python zoo/enjoy.py --task drawer-open --video drawer.mp4            # headless (EGL) video
    python zoo/enjoy.py --task reach --video reach.gif --episodes 1      # small GIF: 256x256, every 2nd frame
    python zoo/enjoy.py --task push --model logs/d2r/MT10-rand_1 --load-best --render human

Only the chosen task is simulated; its observations (state, goal sequence, task one-hot at the model's index)
are identical to the task's column of the model's training env (see ``zoo/task_env.py``). With a routing policy
(D2R) the video shows the number of modules the route uses at every step.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import gymnasium as gym
import numpy as np
from numpy.typing import ArrayLike

from d2r_sb3.envs import normalize_task_name, short_task_name
from d2r_sb3.zoo.task_env import make_task_env
from d2r_sb3.zoo.utils import (
    HelpFormatter,
    ZooError,
    add_model_arguments,
    load_model,
    model_env_kwargs,
    parse_key_values,
    run_main,
    set_num_threads,
)

VIDEO_FORMATS = (".mp4", ".gif")
DEFAULT_SIZE = {".mp4": 480, ".gif": 256}  # GIFs are uncompressed-ish: keep them small
DEFAULT_FRAME_SKIP = {".mp4": 1, ".gif": 2}


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (rl-baselines3-zoo's ``enjoy.py`` names where they apply)."""
    parser = argparse.ArgumentParser(
        description="Run a multi-task policy on one task; print what its recorded evaluation says of the task (when "
        "there is one), then the return and success of each episode.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--task", required=True, help="Task to run, e.g. drawer-open (the -v3 suffix is optional)"
    )
    add_model_arguments(parser)
    parser.add_argument("--episodes", type=int, default=3, help="Number of episodes")
    parser.add_argument(
        "--video", metavar="PATH", help="Write the episodes to a .mp4 or .gif file (headless)"
    )
    parser.add_argument(
        "--render", default="none", choices=["none", "human"], help="human: show a window (needs a display)"
    )
    parser.add_argument("--width", type=int, help="Video width in pixels (default: 480 for mp4, 256 for gif)")
    parser.add_argument("--height", type=int, help="Video height in pixels (default: as the width)")
    parser.add_argument(
        "--camera", help="Meta-World camera: corner, corner2, corner3, topview, behindGripper, ..."
    )
    parser.add_argument("--fps", type=int, default=30, help="Frames per second of the video")
    parser.add_argument(
        "--frame-skip", type=int, help="Keep every N-th frame in the video (default: 1 for mp4, 2 for gif)"
    )
    parser.add_argument(
        "--no-overlay", action="store_true", help="Do not write the task and module count on frames"
    )
    return parser


def resolve_task(task: str, task_names: Sequence[str], benchmark: Any) -> str:
    """Full name of ``task`` among the model's tasks; an error listing them otherwise."""
    try:
        full = normalize_task_name(task)
    except ValueError:
        full = None
    if full is None or full not in task_names:
        label = benchmark if isinstance(benchmark, str) else "its custom task list"
        raise ZooError(
            f"Unknown task {task!r} for this model ({label}, {len(task_names)} tasks). Valid tasks: "
            f"{', '.join(short_task_name(name) for name in task_names)}."
        )
    return full


def check_display() -> None:
    """``--render human`` needs a display; say so instead of failing deep inside MuJoCo."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise ZooError(
            "--render human needs a display (DISPLAY is not set). Record a video instead: --video out.mp4"
        )
    if os.environ.get("MUJOCO_GL", "glfw") in ("egl", "osmesa"):
        raise ZooError(
            f"--render human needs MUJOCO_GL=glfw, but MUJOCO_GL={os.environ['MUJOCO_GL']} (headless). Unset it, or "
            "record a video instead: --video out.mp4"
        )


def overlay(frame: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """Write ``lines`` in the top-left corner of a frame (white text on a dark box, readable on any scene)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    size = max(10, frame.shape[0] // 24)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a single bitmap size
        font = ImageFont.load_default()
    text = "\n".join(lines)
    left, top, right, bottom = draw.multiline_textbbox((4, 4), text, font=font)
    draw.rectangle((left - 3, top - 3, right + 3, bottom + 3), fill=(0, 0, 0))
    draw.multiline_text((4, 4), text, fill=(255, 255, 255), font=font)
    return np.asarray(image)


def write_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    """Write frames as mp4 (h264 through imageio-ffmpeg) or GIF (duration per frame in ms, looping)."""
    try:
        import imageio.v2 as imageio
    except ImportError:
        raise ZooError(
            "Writing videos needs imageio: pip install imageio imageio-ffmpeg (the [zoo] extra)."
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    images = cast("list[ArrayLike]", frames)  # (imageio takes a list of array-likes: arrays are)
    if path.suffix.lower() == ".gif":
        imageio.mimsave(path, images, duration=1000 / fps, loop=0)
        return
    try:
        imageio.mimsave(path, images, fps=fps, macro_block_size=16)
    except (ImportError, RuntimeError, ValueError) as err:  # imageio's error when no ffmpeg backend exists
        raise ZooError(f"Cannot write {path}: {err}. Install imageio-ffmpeg, or write a .gif.") from None


def check_video_writer(path: Path, fps: int) -> None:
    """Fail before anything is rendered when ``path``'s video writer is missing (not after every frame).

    Opens (and closes, with no frame) the very writer :func:`write_video` uses, in a temporary folder.
    """
    import tempfile

    if fps < 1:
        raise ZooError(f"--fps must be >= 1, got {fps}.")
    suffix = path.suffix.lower()
    package = "imageio-ffmpeg" if suffix == ".mp4" else "pillow"
    try:
        import imageio.v2 as imageio

        with tempfile.TemporaryDirectory() as folder:
            probe = Path(folder) / f"probe{suffix}"
            kwargs = (
                dict(duration=1000 / fps, loop=0) if suffix == ".gif" else dict(fps=fps, macro_block_size=16)
            )
            imageio.get_writer(probe, **kwargs).close()
    except (ImportError, RuntimeError, ValueError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ZooError(
            f"Cannot write the {suffix} video {path} ({reason}): install the writer with `pip install imageio "
            f"{package}` (the [zoo] extra){', or write a .gif' if suffix == '.mp4' else ''}. Nothing was run."
        ) from None


class ModuleCounter:
    """Number of modules the policy's route uses for an observation (None for policies that do not route)."""

    def __init__(self, loaded: Any, deterministic: bool) -> None:
        self.loaded = loaded
        self.deterministic = deterministic
        self.enabled = hasattr(loaded.policy, "route")

    def __call__(self, obs: np.ndarray) -> tuple[int, int] | None:
        """``(active modules, total modules)`` of the route that acted on ``obs``."""
        if not self.enabled:
            return None
        if not self.deterministic:
            # A fresh sample would not be the route that acted; compute skipping recorded the real count.
            computed = getattr(self.loaded.policy.actor, "last_modules_computed", None)
            total = getattr(self.loaded.policy.actor.net, "n_modules", None)
            return (int(computed), int(total)) if computed is not None and total is not None else None
        path = self.loaded.route(obs[None], deterministic=True)
        return int(path.num_active[0]), int(path.active.shape[-1])


def check_output_options(args: argparse.Namespace) -> Path | None:
    """Check the episode count, the video path and the display before anything is loaded; the video path."""
    if args.episodes < 1:
        raise ZooError(f"--episodes must be >= 1, got {args.episodes}.")
    video = Path(args.video) if args.video else None
    if video is not None:
        if video.suffix.lower() not in VIDEO_FORMATS:
            raise ZooError(f"--video must end in {' or '.join(VIDEO_FORMATS)}, got {video.name!r}.")
        check_video_writer(video, args.fps)
    if args.render == "human":
        check_display()
    return video


def render_settings(args: argparse.Namespace, video: Path | None) -> tuple[dict[str, Any], int]:
    """The env's render arguments and the frame skip, for a video, a window or neither."""
    if video is not None:
        suffix = video.suffix.lower()
        width = args.width or DEFAULT_SIZE[suffix]
        frame_skip = args.frame_skip or DEFAULT_FRAME_SKIP[suffix]
        if frame_skip < 1:
            raise ZooError(f"--frame-skip must be >= 1, got {frame_skip}.")
        render = dict(
            render_mode="rgb_array", width=width, height=args.height or width, camera_name=args.camera
        )
        return render, frame_skip
    if args.render == "human":
        return dict(render_mode="human", camera_name=args.camera), 1
    return {}, 1


@dataclass
class Episode:
    """What one episode gave: its return, success, length and modules used per step (D2R models only)."""

    episode_return: float = 0.0
    success: bool = False
    length: int = 0
    modules_used: list[int] = field(default_factory=list)

    def summary(self, number: int) -> str:
        routing = f", {np.mean(self.modules_used):.1f} modules per step" if self.modules_used else ""
        return (
            f"Episode {number}: return {self.episode_return:.2f}, success {self.success}, {self.length} steps"
            f"{routing}"
        )


def play_episode(
    env: gym.Env,
    loaded: Any,
    count_modules: ModuleCounter,
    args: argparse.Namespace,
    title: str,
    frames: list[np.ndarray] | None,
    frame_skip: int,
) -> Episode:
    """Run one episode; frames for the video go to ``frames`` (every ``frame_skip``-th step, with an overlay)."""
    deterministic = not args.stochastic
    obs, _ = env.reset()
    result, done = Episode(), False
    info: dict[str, Any] = {}
    while not done:
        action, _ = loaded.predict(obs[None], deterministic=deterministic)
        modules = count_modules(obs)
        if modules is not None:
            result.modules_used.append(modules[0])
        if frames is not None and result.length % frame_skip == 0:
            frame = cast(np.ndarray, env.render())  # (an rgb_array env when recording frames)
            if not args.no_overlay:
                lines = [title] + ([f"modules: {modules[0]}/{modules[1]}"] if modules is not None else [])
                frame = overlay(frame, lines)
            frames.append(frame)
        elif args.render == "human":
            env.render()
        obs, reward, terminated, truncated, info = env.step(action[0])
        result.episode_return += float(reward)
        result.length += 1
        done = terminated or truncated
    result.success = bool(info.get("is_success", False))
    return result


def recorded_evaluation_lines(loaded: Any, task: str, overridden: bool = False) -> list[str]:
    """What the policy's recorded evaluation (its ``results.json``) says of ``task``, so that a user knows what
    to expect before watching: the task's success rate, the mean, and, for a task the policy does not solve, the
    tasks it does solve. Empty when no evaluation was recorded with the policy.

    :param loaded: the :class:`~d2r_sb3.serialization.LoadedPolicy`.
    :param task: the full task name.
    :param overridden: the env settings differ from the policy's own (``--goals``, ``--env-kwargs``).
    """
    record = loaded.evaluation
    if record is None or task not in record.success:
        return []
    name = short_task_name(task)
    rate = record.success[task]
    episodes = (
        f"{record.episodes_per_task} {'deterministic' if record.deterministic else 'stochastic'} episode"
    )
    lines = [
        f"Recorded evaluation of this policy ({record.path.name}, {episodes}{'s' * (record.episodes_per_task != 1)}"
        f" per task{', with its own env settings, which this run overrides' if overridden else ''}): {name} success "
        f"{rate:.2f}, mean over the {len(record.success)} tasks {record.mean_success:.3f}."
    ]
    solved = [short_task_name(other) for other in record.solved_tasks(0.9)]
    if rate < 0.5 and solved:
        listed = ", ".join(solved[:-1]) + (" and " if len(solved) > 1 else "") + solved[-1]
        lines.append(
            f"This policy does not solve {name}; it solves {listed} in at least 90 % of episodes "
            f"(e.g. --task {solved[0]})."
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: load the model, play ``--episodes`` episodes of one task, print them, write the video."""
    args = build_parser().parse_args(argv)
    video = check_output_options(args)
    set_num_threads(args.num_threads)

    loaded = load_model(args.model, args.load_best, args.device, allow_pickle=args.allow_pickle)
    overrides = parse_key_values(args.env_kwargs, "--env-kwargs")
    overrides.update(
        {key: value for key, value in (("seed", args.seed), ("goals", args.goals)) if value is not None}
    )
    env_kwargs = model_env_kwargs(loaded, overrides)
    task = resolve_task(args.task, loaded.task_names, env_kwargs["benchmark"])
    render, frame_skip = render_settings(args, video)
    try:
        env = make_task_env(env_kwargs, task, loaded.task_names, **render)
    except (ValueError, TypeError) as err:
        raise ZooError(f"Cannot build the env of {short_task_name(task)}: {err}") from None

    deterministic = not args.stochastic
    count_modules = ModuleCounter(loaded, deterministic)
    print(
        f"{loaded.source}: {short_task_name(task)} ({args.episodes} episode{'s' * (args.episodes > 1)}, "
        f"{'deterministic' if deterministic else 'stochastic'} policy)"
    )
    # A different seed draws other goals of the same distribution; other settings change what is measured.
    overridden = any(loaded.env_kwargs.get(key) != value for key, value in overrides.items() if key != "seed")
    for line in recorded_evaluation_lines(loaded, task, overridden):
        print(line)
    frames: list[np.ndarray] | None = [] if video is not None else None
    episodes: list[Episode] = []
    try:
        for number in range(1, args.episodes + 1):
            title = f"{short_task_name(task)}  episode {number}"
            episodes.append(play_episode(env, loaded, count_modules, args, title, frames, frame_skip))
            print(episodes[-1].summary(number))
    finally:
        env.close()  # frees the rendering context now (EGL complains when it is freed at exit)
    returns = [episode.episode_return for episode in episodes]
    print(
        f"Mean over {len(returns)} episode{'s' * (len(returns) > 1)}: return {np.mean(returns):.2f} ± "
        f"{np.std(returns):.2f}, success rate {np.mean([episode.success for episode in episodes]):.2f}"
    )
    if video is not None and frames is not None:
        write_video(video, frames, args.fps)
        print(f"Wrote {video} ({len(frames)} frames)")
    return 0


def cli() -> None:
    """The ``d2r-enjoy`` console command (and ``python zoo/enjoy.py``): :func:`main` with clean error exits."""
    run_main(main)


if __name__ == "__main__":
    cli()
