"""The embedded sample dataset: scripted PushT demonstrations, written as a LeRobot v3.0 dataset.

    python -m flywheel.pusht.sample --out datasets/pusht [--episodes 20 --seed 0 --variant default]

The `gym_pusht/PushT-v0` simulator (pymunk physics, 10 Hz control, no network) is driven by a scripted
pusher that walks around the T block and pushes it toward the target pose. Everything is a function of
the config: the same config gives the same frame data (parquet) on every run.

Per frame (LeRobot features):
  observation.image              video, [S, S, 3] RGB render (S = image_size), as the variant colours and views it
  observation.state              float32 [2]  agent x, y (simulator pixels, 0..512)
  action                         float32 [2]  the agent's target x, y for the next 0.1 s (the env action)
  observation.environment_state  float32 [5]  agent x, y, block x, y, block angle (rad, in [0, 2pi))
  plus LeRobot's own timestamp / frame_index / episode_index / index / task_index; one task string.

Per episode, `meta/pusht_sample.json` (next to LeRobot's own meta files) records the generator config
and, for every episode, `reset_seed` and `initial_state` ([agent x, y, block x, y, angle], float64), the
exact argument the episode was reset with: `env.reset(options={"reset_to_state": initial_state})`, then
stepping the recorded `action`s, reproduces `observation.environment_state` frame by frame.
`meta/preview.png` is a contact sheet of the first episodes, to look at.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flywheel.pusht import INFO_FILE

ENV_ID = "gym_pusht/PushT-v0"
FPS = 10  # PushTEnv.metadata["render_fps"]: one action per 0.1 s
ACTION_LOW, ACTION_HIGH = 0.0, 512.0  # PushTEnv.action_space bounds
PREVIEW_FILE = "meta/preview.png"  # the first PREVIEW_EPISODES episodes, PREVIEW_FRAMES frames each
PREVIEW_EPISODES, PREVIEW_FRAMES = 4, 8


# ── Variants: the same scenes, differently coloured or seen ──────────────────────────────────────────────

# The colours PushTEnv paints with (measured on its renders): background, goal, block fill, agent.
RENDER_PALETTE = ((255, 255, 255), (144, 238, 144), (143, 163, 184), (65, 105, 225))


@dataclass(frozen=True)
class Variant:
    """One look of the PushT scene. `palette` None keeps the simulator's colours; otherwise the four
    render colours (background, goal, block, agent) are sent to `palette` by one affine colour map, so
    anti-aliased edges between two colours become the same blend of the new colours. `quarter_turns`
    turns the top-down camera about its axis (counter-clockwise in the image): the world, its states
    and actions are unchanged, only the view is."""

    name: str
    task: str
    palette: tuple[tuple[int, int, int], ...] | None = None
    quarter_turns: int = 0

    def show(self, frame: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] simulator render as this variant's camera records it."""
        frame = self.colour(frame)
        return np.ascontiguousarray(np.rot90(frame, self.quarter_turns)) if self.quarter_turns % 4 else frame

    def colour(self, frame: np.ndarray) -> np.ndarray:
        """uint8 [..., 3] frame as this variant shows it."""
        if self.palette is None:
            return frame
        colour_map = affine_colour_map(RENDER_PALETTE, self.palette)
        rgb = frame.astype(np.float32) @ colour_map[:3] + colour_map[3]
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def affine_colour_map(src: tuple, dst: tuple) -> np.ndarray:
    """The [4, 3] matrix M with [r, g, b, 1] @ M = new colour, exact on the four given colour pairs."""
    a = np.concatenate([np.asarray(src, np.float64), np.ones((4, 1))], axis=1)
    return np.linalg.solve(a, np.asarray(dst, np.float64)).astype(np.float32)


VARIANTS: dict[str, Variant] = {
    "default": Variant("default", "Push the T-shaped block onto the green T-shaped target."),
    # Dark slate floor, orange target, teal block, red agent: a visibly different domain, same physics.
    "recolored": Variant(
        "recolored",
        "Push the T-shaped block onto the orange T-shaped target.",
        palette=((38, 42, 56), (235, 150, 50), (40, 170, 160), (220, 50, 60)),
    ),
    # The same table filmed by a camera mounted a quarter turn round: every object and motion is where
    # the default camera would put it turned by 90 degrees; same colours, same task.
    "rotated": Variant("rotated", "Push the T-shaped block onto the green T-shaped target.", quarter_turns=1),
}


# ── Config ───────────────────────────────────────────────────────────────────────────────────────


class PushTSampleConfig(BaseModel):
    """Everything the generated dataset is a function of."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    episodes: int = Field(20, ge=1, le=1000, description="number of episodes")
    seed: int = Field(0, ge=0, lt=2**32, description="master seed; episode i starts from episode_reset_seed(seed, i)")
    variant: Literal["default", "recolored", "rotated"] = "default"
    max_steps: int = Field(200, ge=2, le=300, description="frames per episode at most (it ends early when solved)")
    image_size: int = Field(96, ge=32, le=512, description="square render size of observation.image")

    @property
    def repo_id(self) -> str:
        return "flywheel/pusht" if self.variant == "default" else f"flywheel/pusht_{self.variant}"


def episode_reset_seed(seed: int, episode_index: int) -> int:
    """The env reset seed of one episode: independent of how many episodes are generated."""
    return int(np.random.SeedSequence([seed, episode_index]).generate_state(1)[0])


# ── Scripted pusher ──────────────────────────────────────────────────────────────────────────────

# The T in block coordinates (PushTEnv.add_tee, scale 30): bar x in [-60, 60], y in [0, 30];
# stem x in [-15, 15], y in [30, 120]; centre of gravity between the two rectangles' centres.
T_BAR = np.array([[-60, 0], [60, 0], [60, 30], [-60, 30]], np.float64)
T_STEM = np.array([[-15, 30], [15, 30], [15, 120], [-15, 120]], np.float64)
T_COG = np.array([0.0, 45.0])
GOAL_POSE = np.array([256.0, 256.0, math.pi / 4])  # PushTEnv._setup
AGENT_RADIUS = 15.0

# Contact points on the T's boundary with the direction the agent pushes there (block coordinates).
PUSH_CANDIDATES = np.array(
    [
        # point x, y, push dx, dy
        [-40, 0, 0, 1], [0, 0, 0, 1], [40, 0, 0, 1],  # outer face of the bar
        [-45, 30, 0, -1], [45, 30, 0, -1],  # underside of the bar
        [-60, 15, 1, 0], [60, 15, -1, 0],  # bar ends
        [-15, 60, 1, 0], [-15, 105, 1, 0], [15, 60, -1, 0], [15, 105, -1, 0],  # stem sides
        [0, 120, 0, -1],  # stem end
    ],
    np.float64,
)


def rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def wrap_angle(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def cross2(a: np.ndarray, b: np.ndarray) -> float:
    return float(a[0] * b[1] - a[1] * b[0])


def clip_norm(v: np.ndarray, max_norm: float) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v if n <= max_norm else v * (max_norm / n)


def pose_error(block_xy: np.ndarray, angle: float, rot: np.ndarray) -> tuple[np.ndarray, float]:
    """How far the block's centre of gravity is from the goal's (px, as a vector) and how far it must turn (rad)."""
    goal_cog = GOAL_POSE[:2] + rotation(GOAL_POSE[2]) @ T_COG
    return goal_cog - (block_xy + rot @ T_COG), wrap_angle(GOAL_POSE[2] - angle)


def segment_hits_block(a: np.ndarray, b: np.ndarray, block_xy: np.ndarray, rot: np.ndarray, margin: float) -> bool:
    """Whether a disc of radius `margin` moving from a to b would touch the T (sampled along the path)."""
    for t in np.linspace(0.0, 1.0, 12):
        p_local = rot.T @ (a + t * (b - a) - block_xy)
        for lo, hi in ((T_BAR[0], T_BAR[2]), (T_STEM[0], T_STEM[2])):
            nearest = np.clip(p_local, lo, hi)
            if np.linalg.norm(p_local - nearest) < margin:
                return True
    return False


class ScriptedPusher:
    """Pick the contact on the T whose push best reduces the pose error, walk around the block to just
    behind it, push through it; repeat. Actions are PD targets a bounded distance from the agent, so
    the motion is smooth, like a teleoperator's."""

    travel_lead = 60.0  # px between agent and target while travelling (~30 px per step)
    push_lead = 30.0  # px the target leads the agent while pushing
    orbit_radius = 110.0  # px from the block's centre: clears the T (max extent 77) plus the agent
    switch_margin = 0.4  # a new contact must score this much better to abandon the current one

    def __init__(self) -> None:
        self.contact: int | None = None
        self.pushing = False

    def act(self, agent_xy: np.ndarray, block_pose: np.ndarray) -> np.ndarray:
        agent_xy = np.asarray(agent_xy, np.float64)
        block_xy, angle = np.asarray(block_pose[:2], np.float64), float(block_pose[2])
        rot = rotation(angle)
        err, d_angle = pose_error(block_xy, angle, rot)
        scores = self._scores(block_xy, rot, err, d_angle)
        best = int(np.argmax(scores))
        current = scores[self.contact] if self.contact is not None else -np.inf
        if best != self.contact and (scores[best] > current + self.switch_margin or current < 0.05):
            self.contact, self.pushing = best, False

        point = block_xy + rot @ PUSH_CANDIDATES[self.contact, :2]
        push_dir = rot @ PUSH_CANDIDATES[self.contact, 2:]
        touching = point - push_dir * AGENT_RADIUS  # agent centre when it just touches the contact
        standoff = touching - push_dir * 8.0
        if self.pushing:
            # Lost the contact (block slid or turned away): walk back to behind it.
            behind = float(np.dot(touching - agent_xy, push_dir))
            lateral = abs(cross2(push_dir, touching - agent_xy))
            if behind > 25.0 or behind < -10.0 or lateral > 14.0:
                self.pushing = False
        if not self.pushing and np.linalg.norm(standoff - agent_xy) < 6.0:
            self.pushing = True

        if self.pushing:
            # Push exactly as far as the block still has to go: the block stops when the agent does
            # (the space is fully damped), so a proportional push settles instead of overshooting.
            torque_arm = cross2(point - (block_xy + rot @ T_COG), push_dir)
            turn_needed = abs(d_angle) * abs(torque_arm) if torque_arm * d_angle > 0 else 0.0
            needed = max(float(np.dot(err, push_dir)), turn_needed, 0.0)
            goal = touching + push_dir * min(needed, 30.0)
            target = agent_xy + clip_norm(goal - agent_xy, self.push_lead)
        else:
            waypoint = self._waypoint(agent_xy, standoff, block_xy, rot)
            target = agent_xy + clip_norm(waypoint - agent_xy, self.travel_lead)
        return np.clip(target, ACTION_LOW + 1.0, ACTION_HIGH - 1.0).astype(np.float32)

    def _scores(self, block_xy: np.ndarray, rot: np.ndarray, err: np.ndarray, d_angle: float) -> np.ndarray:
        cog = block_xy + rot @ T_COG
        dist = float(np.linalg.norm(err))
        err_dir = err / dist if dist > 1e-6 else np.zeros(2)
        # Relative weight of turning vs translating (40 px ~ 22 degrees of error), scaled so the larger is 1.
        w_move, w_turn = dist / 40.0, abs(d_angle) / math.radians(22.5)
        scale = max(w_move, w_turn, 1e-6)
        w_move, w_turn = w_move / scale, w_turn / scale
        scores = np.empty(len(PUSH_CANDIDATES))
        for i, (px, py, dx, dy) in enumerate(PUSH_CANDIDATES):
            point = block_xy + rot @ np.array([px, py])
            push_dir = rot @ np.array([dx, dy])
            torque = cross2(point - cog, push_dir) / 75.0  # in [-1, 1]: 75 px is the T's reach
            scores[i] = w_move * float(np.dot(push_dir, err_dir)) + w_turn * torque * math.copysign(1.0, d_angle)
            standoff = point - push_dir * (AGENT_RADIUS + 8.0)
            if np.any(standoff < 20.0) or np.any(standoff > 492.0):
                scores[i] = -np.inf  # behind it is the wall
        return scores

    def _waypoint(self, agent_xy, standoff, block_xy, rot) -> np.ndarray:
        """Straight to the standoff if the path is clear, else along a circle around the block."""
        if not segment_hits_block(agent_xy, standoff, block_xy, rot, AGENT_RADIUS + 3.0):
            return standoff
        cog = block_xy + rot @ T_COG
        a_from, a_to = (math.atan2(*(p - cog)[::-1]) for p in (agent_xy, standoff))
        step = wrap_angle(a_to - a_from)
        a_next = a_from + math.copysign(min(abs(step), math.radians(50)), step)
        radius = max(self.orbit_radius, float(np.linalg.norm(standoff - cog)))
        return np.clip(cog + radius * np.array([math.cos(a_next), math.sin(a_next)]), 20.0, 492.0)


# ── Rollouts ─────────────────────────────────────────────────────────────────────────────────────


def make_env(image_size: int = 96):
    """A PushT env that renders `image_size` x `image_size` RGB observations (gym_pusht registers the id)."""
    import gymnasium as gym

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pygame's pkg_resources deprecation notice
        import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)

        return gym.make(ENV_ID, obs_type="pixels_agent_pos", observation_width=image_size,
                        observation_height=image_size)


@dataclass
class Episode:
    """One scripted rollout: T frames, each the observation before the action of the same index. It ends
    after max_steps actions or at the action that solves it (the solved state itself is not a frame)."""

    reset_seed: int
    initial_state: list[float]  # agent x, y, block x, y, angle: the reset_to_state argument it started from
    images: list[np.ndarray]
    states: np.ndarray  # float32 [T, 2]
    actions: np.ndarray  # float32 [T, 2]
    environment_states: np.ndarray  # float32 [T, 5]
    success: bool
    final_coverage: float
    max_coverage: float


def environment_state(info: dict) -> np.ndarray:
    block = info["block_pose"]
    return np.array([*info["pos_agent"], block[0], block[1], block[2] % (2 * math.pi)], np.float32)


def sample_initial_state(reset_seed: int) -> list[float]:
    """An episode's start, drawn like PushTEnv.reset draws it (same ranges), from our own generator.

    We pass it to the env as `reset_to_state` rather than letting the env draw it, so the recorded
    value is exactly the argument that reproduces the episode. (PushTEnv sets the block's angle after
    its position, turning it about its centre of gravity: the block pose the env then reports is not
    a valid `reset_to_state` argument for the same scene.)"""
    rng = np.random.default_rng(reset_seed)
    agent, block = rng.integers(50, 450, size=2), rng.integers(100, 400, size=2)
    return [float(agent[0]), float(agent[1]), float(block[0]), float(block[1]), float(rng.uniform(-math.pi, math.pi))]


def rollout_episode(env, reset_seed: int, max_steps: int, variant: Variant) -> Episode:
    initial_state = sample_initial_state(reset_seed)
    obs, info = env.reset(seed=reset_seed, options={"reset_to_state": initial_state})
    pusher = ScriptedPusher()
    images, states, actions, env_states = [], [], [], []
    coverage, max_coverage, success = 0.0, 0.0, False
    for _ in range(max_steps):
        action = pusher.act(info["pos_agent"], info["block_pose"])
        images.append(variant.show(obs["pixels"]))
        states.append(np.asarray(obs["agent_pos"], np.float32))
        actions.append(action)
        env_states.append(environment_state(info))
        obs, _, terminated, truncated, info = env.step(action)
        coverage = float(info["coverage"])
        max_coverage = max(max_coverage, coverage)
        if terminated or truncated:
            success = bool(info["is_success"])
            break
    return Episode(reset_seed, initial_state, images, np.stack(states), np.stack(actions), np.stack(env_states),
                   success, coverage, max_coverage)


# ── Dataset ──────────────────────────────────────────────────────────────────────────────────────


def pusht_features(image_size: int) -> dict:
    return {
        "observation.image": {"dtype": "video", "shape": (image_size, image_size, 3),
                              "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (2,), "names": ["agent_x", "agent_y"]},
        "action": {"dtype": "float32", "shape": (2,), "names": ["target_x", "target_y"]},
        "observation.environment_state": {"dtype": "float32", "shape": (5,),
                                          "names": ["agent_x", "agent_y", "block_x", "block_y", "block_angle"]},
    }


def write_pusht_dataset(
    out: str | os.PathLike,
    config: PushTSampleConfig | None = None,
    *,
    force: bool = False,
    progress: Callable[[dict], None] | None = None,
) -> Path:
    """Generate the dataset into a temp dir next to `out`, then rename it into place. Returns `out`."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    config = config or PushTSampleConfig()
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force (force=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    variant = VARIANTS[config.variant]
    env = make_env(config.image_size)
    bar = None
    if progress is None:
        from tqdm import tqdm

        bar = tqdm(total=config.episodes, desc=f"pusht {config.variant}", unit="episode")
    dataset = None
    try:
        dataset = LeRobotDataset.create(repo_id=config.repo_id, fps=FPS, features=pusht_features(config.image_size),
                                        root=tmp, robot_type="pusht", use_videos=True)
        records, preview_rows = [], []
        for index in range(config.episodes):
            episode = rollout_episode(env, episode_reset_seed(config.seed, index), config.max_steps, variant)
            for t in range(len(episode.actions)):
                dataset.add_frame({
                    "observation.image": episode.images[t],
                    "observation.state": episode.states[t],
                    "action": episode.actions[t],
                    "observation.environment_state": episode.environment_states[t],
                    "task": variant.task,
                })
            dataset.save_episode()
            if index < PREVIEW_EPISODES:
                picks = np.linspace(0, len(episode.images) - 1, PREVIEW_FRAMES).round().astype(int)
                preview_rows.append([episode.images[t] for t in picks])
            records.append(dict(episode_index=index, reset_seed=episode.reset_seed,
                                initial_state=episode.initial_state, num_frames=len(episode.actions),
                                success=episode.success, final_coverage=round(episode.final_coverage, 4),
                                max_coverage=round(episode.max_coverage, 4)))
            event = dict(stage="pusht_sample", episode=index + 1, episodes=config.episodes,
                         frames=len(episode.actions), success=episode.success)
            if progress is not None:
                progress(event)
            else:
                bar.update(1)
        dataset.finalize()
        info = dict(generator="flywheel.pusht.sample", env_id=ENV_ID, config=config.model_dump(),
                    repo_id=config.repo_id, task=variant.task, episodes=records)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        from flywheel.preview import contact_sheet

        contact_sheet([np.stack(row) for row in preview_rows], [f"episode {i}" for i in range(len(preview_rows))],
                      tmp / PREVIEW_FILE, frames_per_video=len(preview_rows[0]), scale=1.0)
        shutil.rmtree(tmp / "images", ignore_errors=True)  # LeRobot's per-frame PNG staging, if left over
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)  # LeRobot's temp files come out owner-only
        _replace(tmp, out)
    except BaseException:
        if dataset is not None:
            # Close LeRobot's writers first: left to the garbage collector they would flush into `tmp` again.
            with contextlib.suppress(Exception):
                dataset.finalize()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        env.close()
        if bar is not None:
            bar.close()
    return out



def _replace(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` is moved aside first and removed only after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(new, out)
    if old is not None:
        shutil.rmtree(old)


def read_sample_info(root: str | os.PathLike) -> dict:
    """The generator config and per-episode reset seeds / initial states of a dataset written here."""
    path = Path(root) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {root} a dataset made by flywheel.pusht.sample? "
                                "Regenerate it with `python -m flywheel.pusht.sample --out ...`")
    return json.loads(path.read_text())


# ── CLI ──────────────────────────────────────────────────────────────────────────────────────────


def main(argv: list[str] | None = None) -> int:
    defaults = PushTSampleConfig()
    parser = argparse.ArgumentParser(prog="python -m flywheel.pusht.sample", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="dataset root to create")
    parser.add_argument("--episodes", type=int, default=defaults.episodes)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default=defaults.variant)
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole config per episode otherwise
    try:
        config = PushTSampleConfig(episodes=args.episodes, seed=args.seed, variant=args.variant,
                                   max_steps=args.max_steps, image_size=args.image_size)
        out = write_pusht_dataset(args.out, config, force=args.force)
    except (FileExistsError, ValidationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    episodes = read_sample_info(out)["episodes"]
    frames = sum(e["num_frames"] for e in episodes)
    successes = sum(e["success"] for e in episodes)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {len(episodes)} episodes, {frames} frames, {successes} solved, {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
