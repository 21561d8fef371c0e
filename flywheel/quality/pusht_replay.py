"""Simulator replay for the sample PushT domain: does the video show what its pseudo-actions would do?

Reset gym-pusht to the source episode's recorded initial state, execute the pseudo-actions (resampled to
the env's 10 Hz), render, and compare where the agent and the block are in the rollout and in the
generated video. Positions come from the same colour detector on both image streams (centroid of the
agent's / block's colour), so no coordinate conventions are involved; errors are reported in simulator
units (the 512 x 512 world). Frame t is the observation *before* action t, as in the dataset.
"""

from __future__ import annotations

import numpy as np

from flywheel.label.episodes import resize_frames
from flywheel.label.labeling import nearest_indices, resample_actions

ENV_FPS = 10.0
WORLD_SIZE = 512.0
AGENT_RGB = (65, 105, 225)     # PushTEnv's colours, as rendered (see flywheel.data.pusht_sample.RENDER_PALETTE)
BLOCK_RGB = (143, 163, 184)


def colour_centroids(frames: np.ndarray, rgb: tuple[int, int, int], tol: float = 40.0) -> np.ndarray:
    """[T, 2] (x, y) centroid in pixels of the pixels within `tol` of `rgb`; NaN where none."""
    dist = np.linalg.norm(frames.astype(np.float32) - np.asarray(rgb, np.float32), axis=-1)
    out = np.full((len(frames), 2), np.nan, np.float32)
    for t, mask in enumerate(dist < tol):
        ys, xs = np.nonzero(mask)
        if len(xs):
            out[t] = xs.mean(), ys.mean()
    return out


class PushTReplayVerifier:
    """Verifier for PushT: `source` = {"initial_state": [agent x, y, block x, y, angle], "reset_seed": int?}."""

    name = "pusht_replay"

    def __init__(self, image_size: int = 96, agent_rgb=AGENT_RGB, block_rgb=BLOCK_RGB,
                 video_agent_rgb=None, video_block_rgb=None, tol: float = 60.0):
        self.image_size, self.tol = image_size, tol
        self.agent_rgb, self.block_rgb = agent_rgb, block_rgb
        # A recoloured domain paints the video differently from the simulator's renders.
        self.video_agent_rgb, self.video_block_rgb = video_agent_rgb or agent_rgb, video_block_rgb or block_rgb
        self._env = None

    def _make_env(self):
        if self._env is None:
            from flywheel.data.pusht_sample import make_env

            self._env = make_env(self.image_size)
        return self._env

    def rollout(self, source: dict, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rendered frames [T, S, S, 3] and environment states [T, 5] (agent x, y, block x, y, angle):
        the observation before each action."""
        from flywheel.data.pusht_sample import environment_state

        if "initial_state" not in source:
            raise ValueError("PushTReplayVerifier needs source['initial_state'] (agent x, y, block x, y, angle), "
                             "as recorded in meta/pusht_sample.json of the source dataset")
        env = self._make_env()
        obs, info = env.reset(seed=source.get("reset_seed"), options={"reset_to_state": list(source["initial_state"])})
        frames, states = [], []
        for a in np.asarray(actions, dtype=np.float64):
            frames.append(obs["pixels"])
            states.append(environment_state(info))
            obs, _, _, _, info = env.step(np.clip(a, 0, WORLD_SIZE))
        return np.stack(frames), np.stack(states)

    def environment_states(self, source: dict, actions: np.ndarray, fps: float,
                           lead_in: np.ndarray | None = None) -> np.ndarray:
        """The simulator's state along the pseudo-actions, [T, 5] at the clip's fps: what a refreshed PushT
        dataset stores as observation.environment_state for a synthetic episode. `lead_in`: the source
        episode's recorded actions (at the simulator's 10 Hz) before the clip starts, replayed first, since a
        mid-episode state cannot be reset to directly (gym-pusht's reset_to_state is not the recorded pose)."""
        n = len(actions)
        idx = nearest_indices(n, fps, ENV_FPS)
        acts = resample_actions(actions, fps, ENV_FPS, len(idx)) if abs(fps - ENV_FPS) > 1e-6 else np.asarray(actions)
        skip = 0 if lead_in is None else len(lead_in)
        if skip:
            acts = np.concatenate([np.asarray(lead_in, np.float64).reshape(-1, 2), np.asarray(acts, np.float64)])
        _, states = self.rollout(source, acts)
        states = states[skip:]
        return resample_actions(states, ENV_FPS, fps, n) if abs(fps - ENV_FPS) > 1e-6 else states.astype(np.float32)

    def verify(self, source: dict, frames: np.ndarray, actions: np.ndarray, fps: float) -> dict[str, float]:
        frames = np.asarray(frames)
        idx = nearest_indices(len(frames), fps, ENV_FPS)
        video = resize_frames(frames[idx], self.image_size)
        acts = resample_actions(actions, fps, ENV_FPS, len(idx)) if abs(fps - ENV_FPS) > 1e-6 else np.asarray(actions)
        sim, _ = self.rollout(source, acts)
        scale = WORLD_SIZE / self.image_size
        errors = {}
        for name, sim_rgb, vid_rgb in (("agent", self.agent_rgb, self.video_agent_rgb),
                                       ("block", self.block_rgb, self.video_block_rgb)):
            a = colour_centroids(sim, sim_rgb, self.tol)
            b = colour_centroids(video, vid_rgb, self.tol)
            d = np.linalg.norm(a - b, axis=1) * scale
            # A few frames where compression hides the small agent are skipped; an object missing from most
            # of the video is as bad as the far side of the world.
            found = ~np.isnan(d)
            errors[f"replay_{name}_error"] = float(d[found].mean()) if found.mean() >= 0.5 else WORLD_SIZE
        return errors
