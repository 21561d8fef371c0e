"""Closed-loop rollouts in the PushT simulator, seen through the domain's camera.

A dataset made by `flywheel.pusht.sample` (and every version refreshed from it, which carries its
`meta/pusht_sample.json`) names the variant it was filmed with; `PushTSimulator.from_dataset` reads it, so a
policy trained on `pusht-rotated` is shown the simulator's render turned a quarter turn, by the same
`Variant.show` that rendered the dataset's frames. The world, the agent's state and the actions are never
transformed (the camera turns, not the table).

Episodes are stepped in batches: one batched policy call per control step for up to `batch` envs. An episode
ends when the env reports success (coverage > 0.95, gym-pusht's rule) or after `max_steps` actions; its
final coverage is the env's own `info["coverage"]` after its last action.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from flywheel.pusht.sample import (
    ENV_ID,
    VARIANTS,
    ScriptedPusher,
    Variant,
    environment_state,
    make_env,
    read_sample_info,
    sample_initial_state,
)
from flywheel.errors import DataError
from flywheel.pusht import INFO_FILE, PUSHT


@runtime_checkable
class ActionSource(Protocol):
    """Whatever picks the actions of a batch of episodes: `reset()` before a batch starts, then one call per
    control step with the batch's observations:
      pixels               uint8 [B, S, S, 3]  the domain camera's view (as the dataset's observation.image)
      agent_pos            float32 [B, 2]      observation.state
      environment_state    float32 [B, 5]      agent x, y, block x, y, angle (observation.environment_state)
    returning float [B, 2] actions (the agent's target x, y in simulator pixels)."""

    def reset(self) -> None: ...

    def __call__(self, observation: dict[str, np.ndarray]) -> np.ndarray: ...


@dataclass
class EpisodeOutcome:
    """One closed-loop episode, measured by the env."""

    index: int                  # position in the start list
    reset_seed: int
    initial_state: list[float]  # agent x, y, block x, y, angle (reset_to_state)
    success: bool               # the env's is_success at its last step
    final_coverage: float       # the env's info["coverage"] after the last action
    max_coverage: float
    steps: int                  # actions taken
    frames: list[np.ndarray] | None = None  # the camera's view before each action and after the last, if kept
    block_path: float = 0.0     # how far the block's centre moved (px): 0 when the policy never touched it

    def metrics(self) -> dict[str, float]:
        return dict(success=float(self.success), coverage=self.final_coverage, max_coverage=self.max_coverage,
                    steps=float(self.steps), block_moved=float(self.block_path > 1.0))


@dataclass(frozen=True)
class PushTSimulator:
    """gym-pusht with a domain's camera: `variant` colours / turns the render, `image_size` is its resolution."""

    variant: Variant
    image_size: int = 96
    env_id: str = ENV_ID

    @classmethod
    def from_dataset(cls, root: str | Path) -> PushTSimulator:
        """The simulator a PushT sample dataset (or a version refreshed from one) was recorded in."""
        try:
            info = read_sample_info(root)
        except FileNotFoundError as e:
            raise DataError(f"{Path(root) / INFO_FILE}: not found, so {root} has no known simulator; closed-loop "
                            "evaluation needs a PushT sample dataset (flywheel.pusht.sample) or your own "
                            "evaluator (policy.evaluator, see docs/policy.md)") from e
        config = info.get("config", {})
        name = config.get("variant", "default")
        if name not in VARIANTS:
            raise DataError(f"{Path(root) / INFO_FILE}: config.variant {name!r} is not one of {sorted(VARIANTS)}")
        if info.get("env_id", ENV_ID) != ENV_ID:
            raise DataError(f"{Path(root) / INFO_FILE}: env_id {info.get('env_id')!r}; only {ENV_ID} is supported")
        return cls(VARIANTS[name], int(config.get("image_size", 96)))

    def make_env(self):
        return make_env(self.image_size)

    def observe(self, obs: dict, info: dict) -> dict[str, np.ndarray]:
        """One env observation as the domain's policy gets it (see ActionSource)."""
        return dict(pixels=self.variant.show(obs["pixels"]), agent_pos=np.asarray(obs["agent_pos"], np.float32),
                    environment_state=environment_state(info))


def simulator_for_dataset(root: str | Path) -> PushTSimulator | None:
    """The dataset's simulator, or None where it has none (closed-loop evaluation then needs your evaluator)."""
    return PushTSimulator.from_dataset(root) if PUSHT.recorded(Path(root)) else None


def coverage_of_states(simulator: PushTSimulator, environment_states: np.ndarray) -> np.ndarray:
    """The env's own goal coverage (gym-pusht's _get_coverage) of each [agent x, y, block x, y, angle] state:
    the block's body is put in that pose (angle first, so the position is not moved by turning about the
    centre of gravity; the same body state the env reported) and the env measures it."""
    env = simulator.make_env()
    try:
        env.reset(seed=0)
        pusht = env.unwrapped
        out = np.empty(len(environment_states))
        for i, state in enumerate(np.asarray(environment_states, np.float64)):
            pusht.block.angle = float(state[4])
            pusht.block.position = (float(state[2]), float(state[3]))
            out[i] = pusht._get_coverage()
        return out
    finally:
        env.close()


def starts_from_seeds(seeds: Sequence[int]) -> list[tuple[int, list[float]]]:
    """(reset seed, initial state) per episode; the state is drawn from the seed as the PushT sample does."""
    return [(int(s), sample_initial_state(int(s))) for s in seeds]


@dataclass
class _Running:
    env: object
    outcome: EpisodeOutcome
    observation: dict
    block_xy: np.ndarray
    done: bool = False
    frames: list = field(default_factory=list)


def rollout(simulator: PushTSimulator, source: ActionSource, starts: Sequence[tuple[int, list[float]]],
            max_steps: int, batch: int = 50, keep_frames: int = 0) -> list[EpisodeOutcome]:
    """Run `source` closed-loop from every start, `batch` episodes at a time; the first `keep_frames`
    episodes keep the camera's frames.

    Not `lerobot.scripts.lerobot_eval.rollout`: that one resets a vector env by seed only (we reset to the
    start list's states, shared with the sample data's generator), has no per-episode coverage (the env's
    info["coverage"] is what we report) and no place for the domain's camera transform. The policy side is
    LeRobot's own (see LeRobotPolicyActions)."""
    outcomes: list[EpisodeOutcome] = []
    envs = [simulator.make_env() for _ in range(min(batch, len(starts)))]
    try:
        for first in range(0, len(starts), len(envs)):
            chunk = list(enumerate(starts[first:first + len(envs)], start=first))
            outcomes += _rollout_batch(simulator, source, envs[:len(chunk)], chunk, max_steps, keep_frames)
    finally:
        for env in envs:
            env.close()
    return outcomes


def _rollout_batch(simulator, source, envs, chunk, max_steps, keep_frames) -> list[EpisodeOutcome]:
    running = []
    for env, (index, (reset_seed, initial_state)) in zip(envs, chunk):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gymnasium's note that reset_to_state bypasses the seeded draw
            obs, info = env.reset(seed=reset_seed, options={"reset_to_state": list(initial_state)})
        outcome = EpisodeOutcome(index, reset_seed, list(initial_state), False, 0.0, 0.0, 0)
        run = _Running(env, outcome, simulator.observe(obs, info), np.asarray(info["block_pose"][:2], float))
        if index < keep_frames:
            run.frames.append(run.observation["pixels"])
        running.append(run)
    source.reset()
    for _ in range(max_steps):
        if all(r.done for r in running):
            break
        # Finished episodes stay in the batch with their last observation (the policy's action queues are per
        # batch row), and their actions are dropped.
        observation = {k: np.stack([r.observation[k] for r in running]) for k in running[0].observation}
        actions = np.asarray(source(observation), dtype=np.float64)
        if actions.shape != (len(running), 2):
            raise ValueError(f"the action source returned shape {actions.shape}, expected ({len(running)}, 2)")
        for run, action in zip(running, actions):
            if run.done:
                continue
            obs, _, terminated, truncated, info = run.env.step(np.clip(action, 0.0, 512.0))
            run.observation = simulator.observe(obs, info)
            o = run.outcome
            o.steps += 1
            o.final_coverage = float(info["coverage"])
            o.max_coverage = max(o.max_coverage, o.final_coverage)
            block_xy = np.asarray(info["block_pose"][:2], float)
            o.block_path += float(np.linalg.norm(block_xy - run.block_xy))
            run.block_xy = block_xy
            if run.frames:
                run.frames.append(run.observation["pixels"])
            if terminated or truncated:
                o.success, run.done = bool(info["is_success"]), True
    for run in running:
        run.outcome.frames = run.frames or None
    return [r.outcome for r in running]


class ScriptedActions:
    """The PushT sample's scripted pusher (flywheel.pusht.sample.ScriptedPusher) as an ActionSource: it reads
    the environment state, not the pixels. The expert the sample datasets were recorded with."""

    def __init__(self) -> None:
        self.pushers: list[ScriptedPusher] = []

    def reset(self) -> None:
        self.pushers = []

    def __call__(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        states = observation["environment_state"]
        if len(self.pushers) != len(states):
            self.pushers = [ScriptedPusher() for _ in states]
        return np.stack([p.act(s[:2], s[2:5]) for p, s in zip(self.pushers, states)])


class IdleActions:
    """An agent that holds still where it starts: the block never moves, so every metric is the start's own.
    The do-nothing baseline a trained policy has to beat."""

    def reset(self) -> None:
        pass

    def __call__(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        return observation["agent_pos"].astype(np.float64)


class LeRobotPolicyActions:
    """A trained LeRobot policy as an ActionSource, driven as LeRobot's own eval loop drives it:
    `preprocess_observation` (env arrays to LeRobot keys, images to float CHW), the policy's preprocessor,
    `select_action` (which keeps the chunk's queued actions per batch row), the postprocessor."""

    def __init__(self, trained) -> None:
        self.trained = trained
        self.keys = set(trained.policy.config.input_features)

    def reset(self) -> None:
        self.trained.policy.reset()

    def __call__(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        import torch
        from lerobot.envs.utils import preprocess_observation

        batch = {k: v for k, v in preprocess_observation(observation).items() if k in self.keys}
        batch = self.trained.preprocessor(batch)
        with torch.inference_mode():
            action = self.trained.policy.select_action(batch)
        return self.trained.postprocessor(action).to("cpu").numpy()
