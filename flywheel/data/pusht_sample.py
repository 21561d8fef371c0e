"""The embedded sample dataset: scripted PushT demonstrations, written as a LeRobot v3.0 dataset.

    python -m flywheel.data.pusht_sample --out datasets/pusht [--episodes 20 --seed 0 --variant default]

The `gym_pusht/PushT-v0` simulator (pymunk physics, 10 Hz control, no network) is driven by a scripted
pusher that walks around the T block and pushes it toward the target pose. Everything is a function of
the config: the same config gives the same parquet data, byte for byte.

Per frame (LeRobot features):
  observation.image              video, [S, S, 3] RGB render (S = image_size), as the variant colours it
  observation.state              float32 [2]  agent x, y (simulator pixels, 0..512)
  action                         float32 [2]  the agent's target x, y for the next 0.1 s (the env action)
  observation.environment_state  float32 [5]  agent x, y, block x, y, block angle (rad, in [0, 2pi))
  plus LeRobot's own timestamp / frame_index / episode_index / index / task_index; one task string.

Per episode, `meta/pusht_sample.json` (next to LeRobot's own meta files) records the generator config
and, for every episode, `reset_seed` and `initial_state` (float64, angle unwrapped) so a simulator can be
put back to the episode's start: `env.reset(seed=reset_seed)` or
`env.reset(options={"reset_to_state": initial_state})`, then replay `action`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

ENV_ID = "gym_pusht/PushT-v0"
FPS = 10  # PushTEnv.metadata["render_fps"]: one action per 0.1 s
ACTION_LOW, ACTION_HIGH = 0.0, 512.0  # PushTEnv.action_space bounds
INIT_FILE = "meta/pusht_sample.json"
CODEBASE_VERSION = "v3.0"


# ── Variants: the same scenes, differently coloured ──────────────────────────────────────────────

# The colours PushTEnv paints with (measured on its renders): background, goal, block fill, agent.
RENDER_PALETTE = ((255, 255, 255), (144, 238, 144), (143, 163, 184), (65, 105, 225))


@dataclass(frozen=True)
class Variant:
    """One look of the PushT scene. `palette` None keeps the simulator's colours; otherwise the four
    render colours (background, goal, block, agent) are sent to `palette` by one affine colour map, so
    anti-aliased edges between two colours become the same blend of the new colours."""

    name: str
    task: str
    palette: tuple[tuple[int, int, int], ...] | None = None
    _colour_map: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def colour(self, frame: np.ndarray) -> np.ndarray:
        if self.palette is None:
            return frame
        if self._colour_map is None:
            object.__setattr__(self, "_colour_map", affine_colour_map(RENDER_PALETTE, self.palette))
        rgb1 = np.concatenate([frame.astype(np.float32), np.ones((*frame.shape[:2], 1), np.float32)], axis=-1)
        return np.clip(np.rint(rgb1 @ self._colour_map), 0, 255).astype(np.uint8)


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
}


# ── Config ───────────────────────────────────────────────────────────────────────────────────────


class PushTSampleConfig(BaseModel):
    """Everything the generated dataset is a function of."""

    model_config = ConfigDict(extra="forbid")

    episodes: int = Field(20, ge=1, le=1000, description="number of episodes")
    seed: int = Field(0, ge=0, lt=2**32, description="master seed; episode i resets with episode_reset_seed(seed, i)")
    variant: Literal["default", "recolored"] = "default"
    max_steps: int = Field(160, ge=2, le=300, description="frames per episode at most (an episode ends early on success)")
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
    the motion is smooth, like a slow teleoperator's."""

    travel_lead = 30.0  # px between agent and target while travelling (~15 px per step)
    push_lead = 20.0  # px the target leads the agent while pushing
    orbit_radius = 110.0  # px from the block's centre: clears the T (max extent 77) plus the agent
    switch_margin = 0.25  # a new contact must score this much better to abandon the current one

    def __init__(self) -> None:
        self.contact: int | None = None
        self.pushing = False

    def act(self, agent_xy: np.ndarray, block_pose: np.ndarray) -> np.ndarray:
        agent_xy = np.asarray(agent_xy, np.float64)
        block_xy, angle = np.asarray(block_pose[:2], np.float64), float(block_pose[2])
        rot = rotation(angle)
        scores = self._scores(block_xy, angle, rot)
        best = int(np.argmax(scores))
        if self.contact is None or scores[best] > scores[self.contact] + self.switch_margin or scores[self.contact] < 0.05:
            if best != self.contact:
                self.pushing = False
            self.contact = best

        point = block_xy + rot @ PUSH_CANDIDATES[self.contact, :2]
        push_dir = rot @ PUSH_CANDIDATES[self.contact, 2:]
        standoff = point - push_dir * (AGENT_RADIUS + 8.0)
        if self.pushing:
            # Lost the contact (block slid or turned away): walk back to behind it.
            behind = float(np.dot(point - agent_xy, push_dir))
            lateral = abs(cross2(push_dir, point - agent_xy))
            if behind > AGENT_RADIUS + 25.0 or lateral > 14.0 or behind < 0.0:
                self.pushing = False
        if not self.pushing and np.linalg.norm(standoff - agent_xy) < 6.0:
            self.pushing = True

        if self.pushing:
            target = agent_xy + clip_norm(point + push_dir * 25.0 - agent_xy, self.push_lead)
        else:
            target = agent_xy + clip_norm(self._waypoint(agent_xy, standoff, block_xy, rot) - agent_xy, self.travel_lead)
        return np.clip(target, ACTION_LOW + 1.0, ACTION_HIGH - 1.0).astype(np.float32)

    def _scores(self, block_xy: np.ndarray, angle: float, rot: np.ndarray) -> np.ndarray:
        cog = block_xy + rot @ T_COG
        goal_cog = GOAL_POSE[:2] + rotation(GOAL_POSE[2]) @ T_COG
        err = goal_cog - cog
        dist = float(np.linalg.norm(err))
        err_dir = err / dist if dist > 1e-6 else np.zeros(2)
        d_angle = wrap_angle(GOAL_POSE[2] - angle)
        # Turning first matters more when far off in angle; translating when far off in position.
        w_turn = min(abs(d_angle) / (math.pi / 8), 1.0) * 1.2
        w_move = min(dist / 40.0, 1.0)
        scores = np.empty(len(PUSH_CANDIDATES))
        for i, (px, py, dx, dy) in enumerate(PUSH_CANDIDATES):
            point = block_xy + rot @ np.array([px, py])
            push_dir = rot @ np.array([dx, dy])
            lever = point - cog
            torque = cross2(lever, push_dir) / 75.0  # in [-1, 1]: 75 px is the T's reach
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
