"""Label a video with a trained IDM: sliding windows, overlapping predictions averaged.

Frame rate: the IDM predicts at its native fps (the training dataset's). A video at another fps is first
resampled in time to the native fps (nearest frame for each native timestamp), labelled there, and the
per-step actions are linearly interpolated back onto the video's own frame timestamps. So the output
always has one action per input frame, in the video's time base; `resample_actions` converts to another
fps (e.g. the dataset's, when folding a clip into it).

Window semantics: frames (t, t+k) -> actions a_t .. a_{t+k-1}. Every step is covered by up to k windows;
their mean is the label and their spread (std across windows, in normalised units, averaged over dims) is
the per-step disagreement, a confidence signal. The last frame has no following frame: its action and
disagreement are copied from the step before (hold).
"""

from __future__ import annotations

import numpy as np
import torch

from flywheel.label.config import LabelConfig
from flywheel.label.episodes import resize_frames
from flywheel.label.idm import InverseDynamicsModel


def nearest_indices(num_frames: int, fps: float, target_fps: float) -> np.ndarray:
    """For each timestamp j/target_fps within the clip's duration, the nearest source frame index."""
    if num_frames < 1 or fps <= 0 or target_fps <= 0:
        raise ValueError(f"cannot resample {num_frames} frames from {fps} fps to {target_fps} fps")
    duration = (num_frames - 1) / fps
    n_out = int(np.floor(duration * target_fps + 1e-6)) + 1
    return np.clip(np.rint(np.arange(n_out) / target_fps * fps).astype(int), 0, num_frames - 1)


def resample_actions(actions: np.ndarray, fps: float, target_fps: float, num_out: int | None = None) -> np.ndarray:
    """Linear interpolation of per-frame values [T, ...] from fps onto target_fps timestamps."""
    actions = np.asarray(actions, dtype=np.float64)
    t_src = np.arange(len(actions)) / fps
    n_out = num_out if num_out is not None else len(nearest_indices(len(actions), fps, target_fps))
    t_dst = np.arange(n_out) / target_fps
    flat = actions.reshape(len(actions), -1)
    out = np.stack([np.interp(t_dst, t_src, flat[:, d]) for d in range(flat.shape[1])], axis=1)
    return out.reshape(n_out, *actions.shape[1:]).astype(np.float32)


@torch.no_grad()
def label_native(idm: InverseDynamicsModel, frames: np.ndarray, config: LabelConfig | None = None):
    """Label frames already at the IDM's fps and size: (actions [T, D], disagreement [T])."""
    config = config or LabelConfig()
    k, T = idm.frame_gap, len(frames)
    if T < k + 1:
        raise ValueError(f"video has {T} frames at {idm.fps} fps; the IDM needs at least frame_gap+1 = {k + 1}")
    starts = list(range(0, T - k, config.stride))
    if starts[-1] != T - k - 1:
        starts.append(T - k - 1)  # always cover the last step
    device = next(idm.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(frames))
    total = torch.zeros(T - 1, idm.action_dim, dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    count = torch.zeros(T - 1, 1, dtype=torch.float64)
    for b in range(0, len(starts), config.batch_size):
        s = torch.tensor(starts[b:b + config.batch_size])
        pred = idm(x[s].to(device), x[s + k].to(device)).double().cpu()  # normalised [B, k, D]
        for j, start in enumerate(s.tolist()):
            total[start:start + k] += pred[j]
            total_sq[start:start + k] += pred[j] ** 2
            count[start:start + k] += 1
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(0).sqrt()
    actions = idm.denormalise(mean.float().to(idm.action_mean.device)).cpu().numpy()
    disagreement = std.mean(1).float().numpy()
    return np.concatenate([actions, actions[-1:]]), np.concatenate([disagreement, disagreement[-1:]])


def label_video(idm: InverseDynamicsModel, frames: np.ndarray, fps: float, config: LabelConfig | None = None):
    """Pseudo-actions for a video of any size and fps: (actions [T, D], disagreement [T]), one per input frame."""
    frames = resize_frames(np.asarray(frames), idm.image_size)
    if abs(fps - idm.fps) < 1e-6:
        return label_native(idm, frames, config)
    idx = nearest_indices(len(frames), fps, idm.fps)
    actions, disagreement = label_native(idm, frames[idx], config)
    n = len(frames)
    return resample_actions(actions, idm.fps, fps, n), resample_actions(disagreement, idm.fps, fps, n)
