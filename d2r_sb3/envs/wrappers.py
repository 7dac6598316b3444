"""Generic Gymnasium wrappers used by the multi-task Meta-World env.

They only depend on Gymnasium (no MuJoCo), so they work on any env and are easy to unit-test.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, SupportsFloat

import gymnasium as gym

__all__ = ["EpisodeLimit", "EpisodeReplay", "EpisodeSuccess"]


class EpisodeLimit(gym.Wrapper):
    """End every episode after ``max_episode_steps`` steps, either as a truncation or as a true terminal.

    ``terminal=False`` behaves like :class:`gymnasium.wrappers.TimeLimit` (``truncated=True``, so SB3
    bootstraps through the time limit). ``terminal=True`` reproduces the D2R paper's code, which treats the
    200-step limit as a real end of the episode: the last step returns ``terminated=True, truncated=False``
    and SB3 sees ``info["TimeLimit.truncated"] == False`` (no bootstrap).

    :param env: The env to wrap.
    :param max_episode_steps: Episode length (>= 1).
    :param terminal: Report the limit as a termination instead of a truncation.
    """

    def __init__(self, env: gym.Env, max_episode_steps: int, terminal: bool = False) -> None:
        super().__init__(env)
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        self.max_episode_steps = int(max_episode_steps)
        self.time_limit_terminal = bool(terminal)
        self._elapsed_steps = 0

    @property
    def elapsed_steps(self) -> int:
        """Steps taken in the current episode."""
        return self._elapsed_steps

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._elapsed_steps += 1
        if self._elapsed_steps >= self.max_episode_steps:
            if self.time_limit_terminal:
                # The inner env may also truncate here (Meta-World does at 500): the limit wins.
                terminated, truncated = True, False
            elif not terminated:
                truncated = True
        return obs, reward, terminated, truncated, info

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        self._elapsed_steps = 0
        return self.env.reset(seed=seed, options=options)


class EpisodeSuccess(gym.Wrapper):
    """Report "success at any step of the episode" as ``info["is_success"]`` on the episode's last step.

    Meta-World sets a per-step ``info["success"]``; the multi-task RL protocol (D2R and Meta-World's own
    evaluation) counts an episode as solved if it succeeded at *any* step. SB3 reads ``is_success`` when
    an episode is done (``rollout/success_rate``, ``EvalCallback``), and SB3's ``Monitor`` can record it
    with ``info_keywords=("is_success",)``. The per-step key is left untouched.

    :param env: The env to wrap; its ``info`` must carry ``success_key`` (a missing key counts as failure).
    :param success_key: The per-step success key.
    """

    def __init__(self, env: gym.Env, success_key: str = "success") -> None:
        super().__init__(env)
        self.success_key = success_key
        self._succeeded = False

    @property
    def episode_success(self) -> bool:
        """Whether the current episode has succeeded at some step so far."""
        return self._succeeded

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        # Meta-World reports 0.0/1.0 (and False after a simulator instability).
        self._succeeded = self._succeeded or bool(info.get(self.success_key, False))
        if terminated or truncated:
            info = dict(info)
            info["is_success"] = float(self._succeeded)
        return obs, reward, terminated, truncated, info

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        self._succeeded = False
        return self.env.reset(seed=seed, options=options)


class EpisodeReplay(gym.Wrapper):
    """Make the current episode reproducible: it can be rebuilt exactly from its start and its actions.

    At every reset it remembers the state of the unwrapped env's RNG (``env.unwrapped.np_random``) *before*
    the reset draws from it. :meth:`replay_episode` sets that state again, resets and re-applies the actions
    taken since, which rebuilds the simulator state, the observation and every wrapper's counters below this
    one, without saving any simulator state. Training checkpoints use it to resume mid-episode bit for bit
    (the actions come from the replay buffer). It must be the outermost wrapper, so the replay passes through
    all the others, and the env must draw every random number from ``np_random`` (Meta-World does).

    :param env: The env to wrap.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self._episode_start_rng_state: dict[str, Any] | None = None

    @property
    def episode_start_rng_state(self) -> dict[str, Any] | None:
        """The RNG state the current episode's reset started from (``None`` before the first reset)."""
        return copy.deepcopy(self._episode_start_rng_state)

    def rng_state(self) -> dict[str, Any]:
        """The current state of the unwrapped env's RNG (a numpy ``bit_generator.state`` mapping)."""
        return dict(copy.deepcopy(self.env.unwrapped.np_random.bit_generator.state))

    def set_rng_state(self, state: dict[str, Any]) -> None:
        """Set the unwrapped env's RNG state (for example to continue an evaluation env's goal sequence)."""
        self.env.unwrapped.np_random.bit_generator.state = copy.deepcopy(state)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        self._episode_start_rng_state = self.rng_state()
        return self.env.reset(seed=seed, options=options)

    def replay_episode(self, start_rng_state: dict[str, Any], actions: Sequence[Any]) -> Any:
        """Rebuild an episode: reset from ``start_rng_state``, then step ``actions``; returns the last observation.

        :raises RuntimeError: If the episode ends before the last action (the actions are not this episode's).
        """
        self.set_rng_state(start_rng_state)
        obs, _ = self.reset()
        for i, action in enumerate(actions):
            obs, _, terminated, truncated, _ = self.step(action)
            if (terminated or truncated) and i < len(actions) - 1:
                raise RuntimeError(f"The replayed episode ended after {i + 1} of {len(actions)} actions.")
        return obs
