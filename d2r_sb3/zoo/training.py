"""Training a set-up run: the logger, the evaluation and checkpoint callbacks, stopping on signals, the final
model and its evaluation.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import Logger, configure

from d2r_sb3.common.callbacks import PerTaskEvalCallback
from d2r_sb3.common.checkpoints import (
    CheckpointError,
    TrainingCheckpointCallback,
    TrainingInterrupted,
    atomic_save,
    replay_buffer_nbytes,
    restore_training_state,
)
from d2r_sb3.common.evaluation import evaluate_per_task
from d2r_sb3.common.mt_sac import MultiTaskSAC
from d2r_sb3.common.nonfinite import NonFiniteTrainingError
from d2r_sb3.common.params import parameter_counts
from d2r_sb3.common.provenance import hardware, versions
from d2r_sb3.common.run_layout import RunLayout
from d2r_sb3.serialization import write_safe_policy
from d2r_sb3.zoo.exp_manager import RunSetup, build_env, checkpoint_store, warn_user
from d2r_sb3.zoo.resume import ContinuedCSVOutputFormat
from d2r_sb3.zoo.utils import (
    write_json,
)


def make_logger(run_dir: Path, verbose: int, resumed: bool) -> Logger:
    """stdout (verbose >= 1) + ``progress.csv`` (continued on resume) + TensorBoard when it is installed."""
    formats = ["stdout"] if verbose >= 1 else []
    try:
        import tensorboard  # noqa: F401

        formats.append("tensorboard")
    except ImportError:
        pass
    if not resumed:
        return configure(str(run_dir), [*formats, "csv"])
    logger = configure(str(run_dir), formats)
    logger.output_formats.append(ContinuedCSVOutputFormat(str(RunLayout(run_dir).progress_file)))
    return logger


@dataclass
class Callbacks:
    """The callbacks of a run: the periodic evaluation (if any) and the training checkpoints."""

    evaluation: PerTaskEvalCallback | None
    checkpoints: TrainingCheckpointCallback

    def as_list(self) -> list[BaseCallback]:
        return [c for c in (self.evaluation, self.checkpoints) if c is not None]


def make_callbacks(setup: RunSetup) -> Callbacks:
    """The periodic per-task evaluation and the training checkpoints requested by the flags."""
    args, run_dir = setup.args, setup.run_dir
    evaluation = None
    if args.eval_freq > 0:
        evaluation = PerTaskEvalCallback(
            build_env(setup.env_kwargs),  # separate env, same seed as the training env
            eval_freq_per_task=args.eval_freq,
            n_eval_episodes=args.eval_episodes,
            best_model_save_path=run_dir,
            log_path=run_dir,
            verbose=args.verbose,
        )
    checkpoints = TrainingCheckpointCallback(
        checkpoint_store(run_dir, args.keep_checkpoints),
        save_freq_per_task=args.save_freq if args.save_freq > 0 else None,
        save_interval_minutes=args.save_interval_minutes if args.save_interval_minutes > 0 else None,
        extra_state=(lambda: {"evaluation": evaluation.state_dict()}) if evaluation is not None else None,
        verbose=args.verbose,
    )
    return Callbacks(evaluation, checkpoints)


def restore_callbacks_and_state(setup: RunSetup, callbacks: Callbacks) -> None:
    """Put the evaluation history and every RNG, counter and episode back as the checkpoint saved them."""
    state = setup.training_state
    if state is None:
        return
    saved_evaluation = state["callbacks"].get("evaluation")
    if callbacks.evaluation is not None and saved_evaluation is not None:
        callbacks.evaluation.load_state_dict(saved_evaluation)
    problems: list[str] = []
    exact = restore_training_state(setup.model, state, warn=problems.append)
    if not exact:
        warn_user(f"the resume is not exact ({'; '.join(problems)}): the env starts new episodes.")
    elif setup.args.verbose >= 1:
        print("Resumed exactly where the checkpoint was taken (episodes replayed, RNG states restored).")


STOP_SIGNALS: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}  # exit status per signal
SECOND_CTRL_C_AFTER_S = 0.5
"""A SIGINT this long after the first aborts; sooner, it is the same stop delivered twice (``timeout -s INT``
signals the process and then its process group, within microseconds)."""


class StopOnSignal:
    """While active, SIGINT / SIGTERM ask the checkpoint callback to checkpoint and stop; a second SIGINT at least
    :data:`SECOND_CTRL_C_AFTER_S` later aborts at once."""

    def __init__(self, checkpoints: TrainingCheckpointCallback) -> None:
        self.checkpoints = checkpoints
        self.received: int | None = None
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            if signum == signal.SIGINT and time.monotonic() - self._received_at >= SECOND_CTRL_C_AFTER_S:
                raise KeyboardInterrupt
            return  # the stop already asked for (a job manager or timeout sending it twice)
        self.received, self._received_at = signum, time.monotonic()
        print(f"{signal.Signals(signum).name}: writing a checkpoint, then stopping.", file=sys.stderr)
        self.checkpoints.request_stop()

    def __enter__(self) -> StopOnSignal:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class BackgroundWriteErrorsInOneLine:
    """While active, an ``OSError`` that ends a background thread (TensorBoard's event writer on a full disk)
    prints one line instead of a traceback; the run's own next write meets the same error and reports it with
    the last good checkpoint. Other exceptions keep Python's default report.
    """

    def __init__(self) -> None:
        self._previous = threading.excepthook

    def _hook(self, failure: threading.ExceptHookArgs) -> None:
        if failure.exc_type is not None and issubclass(failure.exc_type, OSError):
            name = failure.thread.name if failure.thread is not None else "?"
            try:
                print(
                    f"warning: a background writer (thread {name}) stopped: {failure.exc_value}",
                    file=sys.stderr,
                )
            except OSError:
                pass  # stderr itself is gone: nothing left to tell
            return
        self._previous(failure)

    def __enter__(self) -> BackgroundWriteErrorsInOneLine:
        self._previous = threading.excepthook
        threading.excepthook = self._hook
        return self

    def __exit__(self, *exc: object) -> None:
        threading.excepthook = self._previous


def final_evaluation(setup: RunSetup, train_seconds: float) -> dict[str, Any]:
    """Evaluate the final model on a fresh env (same seed) and describe the run: the content of results.json."""
    args, model = setup.args, setup.model
    eval_env = build_env(setup.env_kwargs)
    start = time.time()
    result = evaluate_per_task(model, eval_env, n_episodes=args.final_eval_episodes, deterministic=True)
    eval_seconds = time.time() - start
    eval_env.close()
    num_tasks = eval_env.num_tasks
    results: dict[str, Any] = {
        "algo": args.algo,
        "env": setup.name,
        "benchmark": eval_env.benchmark,
        "seed": args.seed,
        "evaluated_model": setup.layout.final_model.name,
        **result.to_dict(),
        "episodes_per_task": result.episodes,
        "total_timesteps": int(model.num_timesteps),
        "timesteps_per_task": int(model.num_timesteps) // num_tasks,
        "n_updates": int(model._n_updates),
        "protocol": {
            "preset": eval_env.preset,
            "goals": eval_env.goals,
            "max_episode_steps": eval_env.max_episode_steps,
            "time_limit_terminal": eval_env.time_limit_terminal,
            "reward_scale": eval_env.reward_scale,
            "reward_function_version": eval_env.reward_function_version,
            "env_seed": eval_env.env_seed,
            "success": "success at any step of the episode, deterministic policy",
        },
        "wall_clock_s": {"train": round(train_seconds, 1), "final_eval": round(eval_seconds, 1)},
        "resumed_from": setup.resumed_from,
        "warm_started_from": setup.warm_started_from,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "hardware": hardware(),
    }
    results["parameters"] = parameter_counts(model.policy)
    if args.verbose >= 1:
        print(result.markdown())
    return results


def warn_if_checkpoints_may_not_fit(model: MultiTaskSAC, run_dir: Path, keep: int) -> None:
    """Warn up front when the disk cannot hold ``keep + 1`` checkpoints with a full replay buffer (the newest
    ``keep`` and the one being written); a run that fills the disk later stops cleanly, but late."""
    buffer = model.replay_buffer
    buffer_bytes = replay_buffer_nbytes(buffer)
    if getattr(buffer, "routes", None) is None and hasattr(
        model.policy, "route"
    ):  # allocated on the first write
        buffer_bytes += 32 * buffer.buffer_size * buffer.n_envs
    params = sum(p.numel() for p in model.policy.parameters())
    needed = (keep + 1) * (
        buffer_bytes + 16 * params
    )  # weights, target critics and two Adam moments, roughly
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        warn_user(
            f"{run_dir} has {free / 2**30:.1f} GB free; {keep} checkpoints plus the one being written need about "
            f"{needed / 2**30:.1f} GB once the replay buffer is full. Free some space, pass --keep-checkpoints 1, "
            f"or use another -f folder."
        )


def _last_checkpoint_note(callbacks: Callbacks) -> str:
    store = callbacks.checkpoints.store
    checkpoints = store.list()
    if not checkpoints:
        return f"No checkpoint was written yet (they go to {store.root})."
    return f"The last good checkpoint is {checkpoints[0].path}; continue with: python zoo/train.py --resume {{run}}"


def _close_after_learning(callbacks: Callbacks, logger: Logger, failed: bool) -> None:
    """Close the evaluation env; after a failure also the logger's outputs, which joins TensorBoard's writer
    thread while its errors are still quieted (a write that fails again here was already reported).
    """
    if callbacks.evaluation is not None:
        callbacks.evaluation.eval_env.close()
    if failed:
        try:
            logger.close()
        except OSError:
            pass


def _announce(setup: RunSetup, remaining: int) -> None:
    num_tasks = setup.env.num_tasks
    if remaining:
        print(
            f"Training {setup.args.algo} on {setup.name} ({num_tasks} tasks) for {remaining} steps "
            f"({remaining // num_tasks} per task); logs in {setup.run_dir}"
        )
    else:  # resumed after its last checkpoint, before its final files were written
        print(
            f"{setup.run_dir} has trained its {setup.model.num_timesteps} steps; writing its final model and "
            "evaluation."
        )


def train(setup: RunSetup) -> int:
    """Learn up to ``setup.n_timesteps``, checkpoint, save the final model and write results.json.

    The training env is closed on every way out (a stop signal and a failure too), so that no env process is left
    for the interpreter's exit to terminate.

    :return: The exit code: 0, 130 / 143 after SIGINT / SIGTERM (checkpointed), 1 when training failed
        (non-finite values, a write error); the last good checkpoint is untouched then.
    """
    try:
        return _train(setup)
    finally:
        setup.env.close()


def _train(setup: RunSetup) -> int:
    args, model, run_dir = setup.args, setup.model, setup.run_dir
    remaining = max(0, setup.n_timesteps - model.num_timesteps)
    if setup.resumed_from is not None:
        setup.layout.results_file.unlink(missing_ok=True)  # it describes the previous final model
    model.set_logger(make_logger(run_dir, args.verbose, resumed=setup.resumed_from is not None))
    num_tasks = setup.env.num_tasks
    if args.verbose >= 1:
        _announce(setup, remaining)
    log_interval = args.log_interval if args.log_interval > 0 else num_tasks
    warn_if_checkpoints_may_not_fit(model, run_dir, args.keep_checkpoints)
    callbacks = make_callbacks(setup)
    restore_callbacks_and_state(setup, callbacks)
    start = time.time()
    failure: str | None = None
    with StopOnSignal(callbacks.checkpoints) as stop, BackgroundWriteErrorsInOneLine():
        try:
            if remaining:
                model.learn(
                    remaining,
                    callback=CallbackList(callbacks.as_list()),
                    log_interval=log_interval,
                    progress_bar=args.progress,
                    reset_num_timesteps=not setup.continues_steps,
                )
                final_checkpoint = callbacks.checkpoints.save()
            else:
                final_checkpoint = callbacks.checkpoints.store.list()[0]  # the one this run resumed from
        except TrainingInterrupted as stopped:
            print(
                f"Stopped at {model.num_timesteps} steps; checkpoint {stopped.checkpoint.path}. "
                f"Continue with: python zoo/train.py --resume {run_dir}",
                file=sys.stderr,
            )
            return STOP_SIGNALS.get(stop.received or signal.SIGINT, 130)
        except NonFiniteTrainingError as err:
            failure = f"training stopped: {err}"
        except (CheckpointError, OSError) as err:
            failure = f"a write failed: {err}"
        finally:
            _close_after_learning(callbacks, model.logger, failed=failure is not None)
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        print(_last_checkpoint_note(callbacks).format(run=run_dir), file=sys.stderr)
        return 1
    train_seconds = time.time() - start

    model_path = atomic_save(model, setup.layout.final_model)
    # policy/ (and best_policy/): the safe files, so the run loads for acting without unpickling anything.
    write_safe_policy(model, run_dir, model_zip=model_path)
    if args.save_replay_buffer:
        tmp = run_dir / f".replay_buffer.tmp-{os.getpid()}.pkl"
        model.save_replay_buffer(tmp)
        os.replace(tmp, setup.layout.replay_buffer_pickle)
    if args.verbose >= 1:
        print(f"Saved {model_path} and {final_checkpoint.path} ({model.num_timesteps} steps)")
    setup.env.close()  # not needed by the final evaluation (closing again in train() is harmless)
    if args.final_eval_episodes > 0:
        write_json(setup.layout.results_file, final_evaluation(setup, train_seconds))
    return 0
