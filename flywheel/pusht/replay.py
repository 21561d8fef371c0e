"""Simulator replay for the sample PushT domains: does the video show what its pseudo-actions would do, and
do those actions get the task anywhere?

Put gym-pusht in the clip's starting state (the source episode's recorded initial state, then the episode's
own recorded actions up to the conditioning frame: a mid-episode state cannot be reset to directly),
execute the pseudo-actions (resampled to the env's 10 Hz), render, and compare where the agent and the
block are in the rollout and in the video. Positions come from the same colour detector on both image
streams (centroid of the agent's / block's colour), after undoing the dataset's view (quarter turns,
palette, from meta/pusht_sample.json), so no coordinate conventions are involved; errors are in simulator
units (the 512 x 512 world). Frame t is the observation *before* action t, as in the dataset.

Scores per clip (`verify`):
- replay_agent_error, replay_block_error: mean centroid distance, rollout vs video ("at most"), each
  object found by how much of its colour a pixel holds over the floor's (`colour_presence`: a codec's
  blur and fading make an object paler, not absent);
- replay_block_overlap: mean IoU of the block's pixels, rollout vs video ("at least"): a block that
  deforms, dissolves or doubles in the video while the simulated one stays a rigid T;
- sim_progress: the task progress the actions make in the simulator: the block's coverage of the goal at
  the clip's last frame minus at its first ("at least"; see FilterConfig.min_progress).
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import numpy as np

from flywheel.label.episodes import resize_frames
from flywheel.label.labeling import nearest_indices, resample_actions
from flywheel.pusht import INFO_FILE

ENV_FPS = 10.0
WORLD_SIZE = 512.0
AGENT_RGB = (65, 105, 225)     # PushTEnv's colours, as rendered (see flywheel.pusht.sample.RENDER_PALETTE)
BLOCK_RGB = (143, 163, 184)
FLOOR_RGB = (255, 255, 255)


def colour_presence(frames: np.ndarray, rgb, background, tol: float = 40.0) -> np.ndarray:
    """[T, H, W] in [0, 1]: how much of colour `rgb` each pixel holds over the `background` colour (the blend
    fraction of a pixel on the line between the two; 0 off that line by more than `tol`). A codec's blur
    and fading blend an object into the floor: a half-faded object is 0.5 here, not missing."""
    p = frames.astype(np.float32) - np.asarray(background, np.float32)
    axis = np.asarray(rgb, np.float32) - np.asarray(background, np.float32)
    alpha = (p @ axis) / float(axis @ axis)
    off_line = np.linalg.norm(p - alpha[..., None] * axis, axis=-1)
    # Beyond the object's own colour (alpha > 1.2) is another, darker object, not more of this one.
    return np.where((off_line < tol) & (alpha <= 1.2), np.clip(alpha, 0.0, 1.0), 0.0)


def presence_centroids(presence: np.ndarray, floor: float = 0.5) -> np.ndarray:
    """[T, 2] (x, y) centroid of the pixels holding at least `floor` of a colour, weighted by how much; NaN
    where there is none."""
    out = np.full((len(presence), 2), np.nan, np.float32)
    weights = np.where(presence >= floor, presence, 0.0)
    ys, xs = np.mgrid[:presence.shape[1], :presence.shape[2]]
    for t, w in enumerate(weights):
        total = w.sum()
        if total > 0:
            out[t] = (xs * w).sum() / total, (ys * w).sum() / total
    return out


def _make_state_env(image_size: int):
    """PushT with state observations: stepping does not render; `_render()` draws a frame on demand."""
    import gymnasium as gym

    from flywheel.pusht.sample import ENV_ID

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pygame's pkg_resources deprecation notice
        import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)

        return gym.make(ENV_ID, obs_type="state", observation_width=image_size, observation_height=image_size)


class PushTReplayVerifier:
    """Verifier for PushT. `source` = {"initial_state": [agent x, y, block x, y, angle], "reset_seed": int?,
    "lead_in": recorded actions [N, 2] at 10 Hz from the episode start up to the clip's first frame?}."""

    name = "pusht_replay"
    directions = {"replay_agent_error": "max", "replay_block_error": "max", "replay_block_overlap": "min",
                  "sim_progress": "min"}

    def __init__(self, image_size: int = 96, agent_rgb=AGENT_RGB, block_rgb=BLOCK_RGB, floor_rgb=FLOOR_RGB,
                 video_agent_rgb=None, video_block_rgb=None, video_floor_rgb=None, tol: float = 40.0,
                 quarter_turns: int = 0):
        self.image_size, self.tol = image_size, tol
        self.agent_rgb, self.block_rgb, self.floor_rgb = agent_rgb, block_rgb, floor_rgb
        # A recoloured domain paints the video differently from the simulator's renders; a turned camera
        # shows it turned (np.rot90 by quarter_turns, as flywheel.pusht.sample.Variant.show does).
        self.video_agent_rgb, self.video_block_rgb = video_agent_rgb or agent_rgb, video_block_rgb or block_rgb
        self.video_floor_rgb = video_floor_rgb or floor_rgb
        self.quarter_turns = quarter_turns
        self._env = None

    @classmethod
    def for_dataset(cls, root: str | Path, **kwargs) -> PushTReplayVerifier | None:
        """The verifier for a dataset written by flywheel.pusht.sample (its view and colours); None for
        any other dataset (no simulator record)."""
        path = Path(root) / INFO_FILE
        if not path.is_file():
            return None
        from flywheel.pusht.sample import VARIANTS

        variant = VARIANTS[json.loads(path.read_text())["config"]["variant"]]
        palette = variant.palette
        return cls(video_agent_rgb=palette[3] if palette else None, video_block_rgb=palette[2] if palette else None,
                   video_floor_rgb=palette[0] if palette else None, quarter_turns=variant.quarter_turns, **kwargs)

    def _make_env(self):
        if self._env is None:
            self._env = _make_state_env(self.image_size)
        return self._env

    def _start(self, source: dict):
        """The env at the clip's first frame: (env, info at that state)."""
        if "initial_state" not in source:
            raise ValueError("PushTReplayVerifier needs source['initial_state'] (agent x, y, block x, y, angle), "
                             "as recorded in meta/pusht_sample.json of the source dataset")
        env = self._make_env()
        _, info = env.reset(seed=source.get("reset_seed"), options={"reset_to_state": list(source["initial_state"])})
        for a in np.asarray(source.get("lead_in", np.zeros((0, 2))), np.float64).reshape(-1, 2):
            _, _, _, _, info = env.step(a)
        return env, info

    def rollout(self, source: dict, actions: np.ndarray, render: bool = True):
        """Rendered frames [T, S, S, 3] (None without `render`), environment states [T, 5] (agent x, y,
        block x, y, angle) and the block's coverage of the goal [T]: the state before each action."""
        from flywheel.pusht.sample import environment_state

        env, info = self._start(source)
        sim = env.unwrapped
        frames, states, coverage = [], [], []
        for a in np.asarray(actions, dtype=np.float64):
            if render:
                frames.append(sim._render())
            states.append(environment_state(info))
            coverage.append(sim._get_coverage())
            _, _, _, _, info = env.step(np.clip(a, 0, WORLD_SIZE))
        return (np.stack(frames) if render else None), np.stack(states), np.asarray(coverage)

    def environment_states(self, source: dict, actions: np.ndarray, fps: float,
                           lead_in: np.ndarray | None = None) -> np.ndarray:
        """The simulator's state along the pseudo-actions, [T, 5] at the clip's fps: what a refreshed PushT
        dataset stores as observation.environment_state for a synthetic episode. `lead_in`: the source
        episode's recorded actions (at the simulator's 10 Hz) before the clip starts, replayed first."""
        n = len(actions)
        acts = self._env_actions(actions, fps, len(nearest_indices(n, fps, ENV_FPS)))
        if lead_in is not None:
            source = {**source, "lead_in": np.asarray(lead_in, np.float64).reshape(-1, 2)}
        _, states, _ = self.rollout(source, acts, render=False)
        return resample_actions(states, ENV_FPS, fps, n) if abs(fps - ENV_FPS) > 1e-6 else states.astype(np.float32)

    @staticmethod
    def _env_actions(actions: np.ndarray, fps: float, count: int) -> np.ndarray:
        return resample_actions(actions, fps, ENV_FPS, count) if abs(fps - ENV_FPS) > 1e-6 else np.asarray(actions)

    def simulator_view(self, frames: np.ndarray) -> np.ndarray:
        """Video frames as the simulator renders them: the camera's quarter turns undone, at image_size."""
        frames = resize_frames(np.asarray(frames), self.image_size)
        return np.ascontiguousarray(np.rot90(frames, -self.quarter_turns, axes=(1, 2))) if self.quarter_turns % 4 else frames

    def verify(self, source: dict, frames: np.ndarray, actions: np.ndarray, fps: float) -> dict[str, float]:
        frames = np.asarray(frames)
        idx = nearest_indices(len(frames), fps, ENV_FPS)
        video = self.simulator_view(frames[idx])
        sim, _, coverage = self.rollout(source, self._env_actions(actions, fps, len(idx)))
        scale = WORLD_SIZE / self.image_size
        scores = {}
        presence = {}
        for name, sim_rgb, vid_rgb in (("agent", self.agent_rgb, self.video_agent_rgb),
                                       ("block", self.block_rgb, self.video_block_rgb)):
            presence[name] = (colour_presence(sim, sim_rgb, self.floor_rgb, self.tol),
                              colour_presence(video, vid_rgb, self.video_floor_rgb, self.tol))
            d = np.linalg.norm(presence_centroids(presence[name][0]) - presence_centroids(presence[name][1]),
                               axis=1) * scale
            # A few frames where the small agent is lost are skipped; an object missing from most of the
            # video is as bad as the far side of the world.
            found = ~np.isnan(d)
            scores[f"replay_{name}_error"] = float(d[found].mean()) if found.mean() >= 0.5 else WORLD_SIZE
        sim_block, video_block = (p >= 0.5 for p in presence["block"])
        union = (sim_block | video_block).sum(axis=(1, 2))
        iou = (sim_block & video_block).sum(axis=(1, 2)) / np.maximum(union, 1)
        scores["replay_block_overlap"] = float(iou.mean())
        scores["sim_progress"] = float(coverage[-1] - coverage[0])
        return scores


def clip_source(root: str | Path, episode_index: int, start_frame: int) -> dict | None:
    """What `verify` needs to start a clip whose conditioning frame is frame `start_frame` (dataset fps) of
    episode `episode_index` of the PushT dataset at `root`: the episode's initial state and its recorded
    actions before that frame. None if the dataset has no simulator record of that episode."""
    path = Path(root) / INFO_FILE
    if not path.is_file():
        return None
    episodes = {e["episode_index"]: e for e in json.loads(path.read_text())["episodes"]}
    if episode_index not in episodes:
        return None
    lead_in = _recorded_actions(str(root), episode_index)[:start_frame]
    if len(lead_in) < start_frame:
        return None
    return {"initial_state": episodes[episode_index]["initial_state"],
            "reset_seed": episodes[episode_index].get("reset_seed"), "lead_in": np.asarray(lead_in, np.float64)}


@functools.lru_cache(maxsize=256)
def _recorded_actions(root: str, episode_index: int) -> np.ndarray:
    from flywheel.label.episodes import recorded_actions

    return recorded_actions(root, episode_index)
