"""Inverse dynamics model: two frames (t, t+k) -> the k actions taken between them.

A small CNN over the stacked pair (frame_t, frame_t+k, their difference) at a fixed square resolution,
predicting the k actions normalised by the training set's per-dimension mean and std. Trained per
domain on real demonstrations; reports unnormalised per-dimension MAE on held-out real episodes next to
a predict-the-training-mean baseline, and draws predicted vs true actions.

Time: the IDM works at its training dataset's fps ("native fps"); `flywheel.label.labeling` resamples
videos of any other frame rate to it before labelling and maps the actions back to the video's frames.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from flywheel.label.config import IdmConfig
from flywheel.label.episodes import (Episode, codec_rendered, dataset_info, list_episodes, load_episodes,
                                     resize_frames)
from flywheel.image_metrics import psnr
from flywheel.store import atomic_write_bytes

MODEL_FILE = "idm.safetensors"
CONFIG_FILE = "idm.json"
METRICS_FILE = "metrics.json"
PLOT_FILE = "pred_vs_true.png"


class InverseDynamicsModel(nn.Module):
    """frames uint8 [B, S, S, 3] x2 -> normalised actions [B, k, D]."""

    def __init__(self, action_dim: int, frame_gap: int, image_size: int, width: int, fps: float,
                 action_names: list[str] | None = None, camera_key: str = ""):
        super().__init__()
        self.action_dim, self.frame_gap, self.image_size, self.width = action_dim, frame_gap, image_size, width
        self.fps, self.camera_key = float(fps), camera_key
        self.action_names = action_names or [f"a{i}" for i in range(action_dim)]
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(9, w, 5, stride=2, padding=2), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 4 * w), nn.SiLU(),
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 4 * w), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        # Flatten (not global pooling): where the arm is in the image is what the action is about.
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.SiLU(), nn.Linear(256, frame_gap * action_dim))
        self.register_buffer("action_mean", torch.zeros(action_dim))
        self.register_buffer("action_std", torch.ones(action_dim))

    def forward(self, frame_a: torch.Tensor, frame_b: torch.Tensor) -> torch.Tensor:
        a = frame_a.permute(0, 3, 1, 2).float() / 127.5 - 1
        b = frame_b.permute(0, 3, 1, 2).float() / 127.5 - 1
        # channels-last: oneDNN's fast convolutions on a CPU (about 9% of a training step here)
        x = torch.cat([a, b, b - a], dim=1).contiguous(memory_format=torch.channels_last)
        out = self.head(self.encoder(x))
        return out.view(-1, self.frame_gap, self.action_dim)

    def normalise(self, actions: torch.Tensor) -> torch.Tensor:
        return (actions - self.action_mean) / self.action_std

    def denormalise(self, actions: torch.Tensor) -> torch.Tensor:
        return actions * self.action_std + self.action_mean

    def describe(self) -> dict:
        return dict(action_dim=self.action_dim, frame_gap=self.frame_gap, image_size=self.image_size,
                    width=self.width, fps=self.fps, action_names=self.action_names, camera_key=self.camera_key)

    def save(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(out_dir / MODEL_FILE))
        atomic_write_bytes(out_dir / CONFIG_FILE, json.dumps(self.describe(), indent=2).encode())
        return out_dir / MODEL_FILE

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> InverseDynamicsModel:
        """Load from a directory written by `save` (or the path of its safetensors file)."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        if not (folder / MODEL_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{folder}: no IDM here (need {MODEL_FILE} and {CONFIG_FILE}); run train_idm first")
        model = cls(**json.loads((folder / CONFIG_FILE).read_text()))
        model.load_state_dict(load_file(str(folder / MODEL_FILE), device=device))
        return model.to(device).eval()


@dataclass
class IdmResult:
    model_path: Path
    metrics: dict
    plot_path: Path
    metrics_path: Path


def split_episodes(all_episodes: list[int], config: IdmConfig) -> tuple[list[int], list[int]]:
    """(train, val) episode indices: config.val_episodes, else the last val_fraction of the episodes."""
    used = list(config.episodes) if config.episodes is not None else list(all_episodes)
    if config.val_episodes is not None:
        val = list(config.val_episodes)
    else:
        n_val = max(1, int(round(len(used) * config.val_fraction)))
        val = used[-n_val:]
    train = [e for e in used if e not in val]
    if not train:
        raise ValueError(f"IDM config leaves no training episodes (episodes={used}, val={val}); use more episodes")
    return train, val


def _window_index(episodes: list[Episode], k: int) -> np.ndarray:
    """(episode position, start t) for every window whose end frame t+k exists."""
    pairs = [(i, t) for i, ep in enumerate(episodes) for t in range(len(ep) - k)]
    if not pairs:
        raise ValueError(f"no episode is longer than frame_gap={k} frames; lower frame_gap")
    return np.asarray(pairs)


def _shift(frames_a: torch.Tensor, frames_b: torch.Tensor, pad: int, gen: torch.Generator):
    """Same random translation for both frames of each pair (replicate padding, then crop)."""
    if pad == 0:
        return frames_a, frames_b
    n, s = frames_a.shape[0], frames_a.shape[1]
    both = torch.cat([frames_a, frames_b], dim=-1).permute(0, 3, 1, 2).float()
    both = F.pad(both, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    # One gather for the whole batch: pair i's crop is rows dy[i].., columns dx[i].. -> [n, s, s, channels]
    rows = (dy[:, None] + torch.arange(s))[:, :, None]
    cols = (dx[:, None] + torch.arange(s))[:, None, :]
    crops = both[torch.arange(n)[:, None, None], :, rows, cols]
    return crops[..., :3], crops[..., 3:]


def fit_idm(train: list[Episode], config: IdmConfig, action_names: list[str] | None = None, camera_key: str = "",
            progress: Callable[[dict], None] | None = None) -> tuple[InverseDynamicsModel, list[float]]:
    """The whole training loop: sample windows, predict k normalised actions, L1 loss, AdamW."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    k = config.frame_gap
    all_actions = np.concatenate([ep.actions for ep in train])
    model = InverseDynamicsModel(all_actions.shape[1], k, config.image_size, config.width, train[0].fps,
                                 action_names, camera_key)
    model.action_mean.copy_(torch.from_numpy(all_actions.mean(0)))
    # Floor the std: a joint that never moves in training must not blow up the loss.
    model.action_std.copy_(torch.from_numpy(np.maximum(all_actions.std(0), 1e-3)))
    model.to(config.device, memory_format=torch.channels_last).train()
    frames = [torch.from_numpy(resize_frames(ep.frames, config.image_size)) for ep in train]
    actions = [model.normalise(torch.from_numpy(ep.actions).to(config.device)) for ep in train]
    windows = _window_index(train, k)
    # fused: one kernel for all tensors, on a CPU too (the per-tensor loop was a tenth of a step here)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.1)
    losses = []
    bar = tqdm(total=config.steps, desc="train IDM", disable=progress is not None, leave=False)
    for step in range(config.steps):
        pick = windows[torch.randint(0, len(windows), (config.batch_size,), generator=gen).numpy()]
        fa = torch.stack([frames[i][t] for i, t in pick])
        fb = torch.stack([frames[i][t + k] for i, t in pick])
        fa, fb = _shift(fa, fb, config.augment_shift, gen)
        target = torch.stack([actions[i][t:t + k] for i, t in pick])
        loss = F.l1_loss(model(fa.to(config.device), fb.to(config.device)), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.update(1)
        if progress is not None and (step % 50 == 0 or step == config.steps - 1):
            progress(dict(stage="train_idm", step=step + 1, total=config.steps, loss=losses[-1]))
    bar.close()
    return model.eval(), losses


def evaluate_idm(model: InverseDynamicsModel, val: list[Episode], train_mean: np.ndarray) -> tuple[dict, list]:
    """Per-dim MAE (unnormalised) of sliding-window labels on held-out episodes, and of the mean baseline."""
    from flywheel.label.labeling import label_video

    errs, base, preds = [], [], []
    for ep in val:
        pred, disagreement = label_video(model, ep.frames, ep.fps)
        errs.append(np.abs(pred - ep.actions))
        base.append(np.abs(train_mean[None] - ep.actions))
        preds.append((ep, pred, disagreement))
    err, base_err = np.concatenate(errs), np.concatenate(base)
    mae, base_mae = err.mean(0), base_err.mean(0)
    metrics = dict(
        val_episodes=[ep.index for ep in val],
        val_frames=int(len(err)),
        mae_per_dim=dict(zip(model.action_names, map(float, mae))),
        baseline_mae_per_dim=dict(zip(model.action_names, map(float, base_mae))),
        mae_mean=float(mae.mean()),
        baseline_mae_mean=float(base_mae.mean()),
        # Scale-free summary: error relative to the baseline, averaged over dims that move at all.
        mae_ratio_to_baseline=float(np.mean((mae / np.maximum(base_mae, 1e-8))[base_mae > 1e-6]))
        if (base_mae > 1e-6).any() else float("nan"),
        disagreement_mean=float(np.mean(np.concatenate([d for _, _, d in preds]))),
    )
    return metrics, preds


def train_idm(dataset_root: str | Path, config: IdmConfig, out_dir: str | Path,
              progress: Callable[[dict], None] | None = None, cache_dir: str | Path | None = None,
              decode_size: int | None = None, codec: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None,
              codec_clip: tuple[int, float] = (17, 16.0)) -> IdmResult:
    """Train an IDM on a LeRobot v3.0 dataset's real episodes; write model, metrics.json and a plot to out_dir.
    `cache_dir`/`decode_size`: keep decoded episodes (at decode_size, default image_size) for reuse.
    `codec`: the world model's codec round trip (clips -> decoded clips), which renders generated clips of
    `codec_clip` (frames, fps); with config.codec_augment the IDM also trains on the training episodes as it
    renders them (`with_codec_renderings`)."""
    dataset_root, out_dir = Path(dataset_root), Path(out_dir)
    info = dataset_info(dataset_root)
    train_ids, val_ids = split_episodes(list_episodes(dataset_root), config)
    load = dict(image_size=decode_size or config.image_size, camera_key=config.camera_key, action_key=config.action_key,
                cache_dir=cache_dir)
    t0 = time.time()
    train = load_episodes(dataset_root, train_ids, **load)
    val = load_episodes(dataset_root, val_ids, **load)
    names = _action_names(info, config.action_key, train[0].actions.shape[1])
    camera_key = config.camera_key or next(k for k, f in info["features"].items() if f.get("dtype") == "video")
    train, codec_meta = with_codec_renderings(train, config, codec, codec_clip, progress)
    t1 = time.time()
    model, losses = fit_idm(train, config, names, camera_key, progress)
    t2 = time.time()
    train_mean = np.concatenate([ep.actions for ep in train]).mean(0)
    metrics, preds = evaluate_idm(model, val, train_mean)
    if codec_meta["used"]:  # and on the held-out episodes as the codec renders them: the videos it will label
        rendered_val = [codec_rendered(ep, codec, *codec_clip) for ep in val]
        codec_meta["val_mae_mean"] = evaluate_idm(model, rendered_val, train_mean)[0]["mae_mean"]
    metrics.update(train_episodes=train_ids, train_windows=int(sum(max(0, len(e) - config.frame_gap) for e in train)),
                   final_loss=float(np.mean(losses[-20:])), decode_s=t1 - t0, train_s=t2 - t1,
                   codec_augment=codec_meta,
                   config=config.model_dump(), dataset_root=str(dataset_root))
    model_path = model.save(out_dir)
    metrics_path = atomic_write_bytes(out_dir / METRICS_FILE, json.dumps(metrics, indent=2).encode())
    plot_path = plot_predicted_vs_true(preds[0][0].actions, preds[0][1], names, out_dir / PLOT_FILE,
                                       title=f"IDM, held-out episode {preds[0][0].index}", max_dims=config.plot_dims,
                                       disagreement=preds[0][2])
    return IdmResult(model_path=model_path, metrics=metrics, plot_path=plot_path, metrics_path=metrics_path)


def with_codec_renderings(train: list[Episode], config: IdmConfig, codec, codec_clip: tuple[int, float],
                          progress: Callable[[dict], None] | None = None):
    """(training episodes, what was done): the episodes plus their codec renderings (`codec_rendered`) when
    config.codec_augment and a codec that renders the domain (mean PSNR >= config.codec_min_psnr) are given.
    The IDM labels generated videos, which the world model's codec decodes: a small moving object it blurs or
    fades is one the IDM never saw in the real frames."""
    if not config.codec_augment or codec is None:
        return train, {"used": False, "reason": "off" if not config.codec_augment else "no codec given"}
    clip_frames, clip_fps = codec_clip
    # The first episode decides whether the codec can render the domain at all (no time spent on the rest).
    first = codec_rendered(train[0], codec, clip_frames, clip_fps)
    fidelity = psnr(train[0].frames, first.frames)
    if fidelity < config.codec_min_psnr:
        return train, {"used": False, "psnr": fidelity,
                       "reason": f"the codec renders training episode {train[0].index} at {fidelity:.1f} dB < "
                                 f"codec_min_psnr {config.codec_min_psnr:g}: it cannot render this domain"}
    rendered = [first]
    for ep in train[1:]:  # about 2 s an episode on a 2-core CPU for tiny-pusht: shown as it goes
        if progress:
            progress({"stage": "codec renderings", "done": len(rendered), "total": len(train)})
        rendered.append(codec_rendered(ep, codec, clip_frames, clip_fps))
    if progress:
        progress({"stage": "codec renderings", "done": len(train), "total": len(train)})
    fidelity = float(np.mean([psnr(ep.frames, r.frames) for ep, r in zip(train, rendered)]))
    return train + rendered, {"used": True, "psnr": fidelity, "episodes": len(rendered)}


def _action_names(info: dict, key: str, dim: int) -> list[str]:
    names = info["features"][key].get("names")
    while isinstance(names, list) and len(names) == 1 and isinstance(names[0], list):
        names = names[0]
    if isinstance(names, dict):
        names = next(iter(names.values()))
    if isinstance(names, list) and len(names) == dim and all(isinstance(n, str) for n in names):
        return names
    return [f"{key}[{i}]" for i in range(dim)]


# ── Plot (PIL; no matplotlib) ─────────────────────────────────────────────────────────────────────

def plot_predicted_vs_true(true: np.ndarray, pred: np.ndarray, names: list[str], path: str | Path, title: str = "",
                           max_dims: int = 6, disagreement: np.ndarray | None = None) -> Path:
    """One panel per action dim (the ones that move most): true in black, predicted in red,
    plus a last panel with the per-step window disagreement."""
    order = np.argsort(-true.std(0))[:max_dims]
    panels = [(names[d], [(true[:, d], (0, 0, 0)), (pred[:, d], (220, 40, 40))]) for d in order]
    if disagreement is not None:
        panels.append(("window disagreement (std, normalised)", [(disagreement, (40, 90, 220))]))
    return line_panels_png(panels, path, title=title + "   black = true, red = predicted")


def line_panels_png(panels: list[tuple[str, list[tuple[np.ndarray, tuple]]]], path: str | Path, title: str = "",
                    cols: int = 2, panel_w: int = 420, panel_h: int = 170) -> Path:
    rows = math.ceil(len(panels) / cols)
    img = Image.new("RGB", (cols * panel_w, rows * panel_h + 24), "white")
    draw = ImageDraw.Draw(img)
    draw.text((6, 5), title, fill=(0, 0, 0))
    for p, (name, series) in enumerate(panels):
        x0, y0 = (p % cols) * panel_w + 44, (p // cols) * panel_h + 40
        w, h = panel_w - 56, panel_h - 40
        values = np.concatenate([np.asarray(s, dtype=float) for s, _ in series])
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
        if hi - lo < 1e-9:
            lo, hi = lo - 1, hi + 1
        draw.rectangle([x0, y0, x0 + w, y0 + h], outline=(160, 160, 160))
        draw.text((x0, y0 - 13), name, fill=(0, 0, 0))
        draw.text((x0 - 42, y0 - 4), f"{hi:.3g}", fill=(90, 90, 90))
        draw.text((x0 - 42, y0 + h - 8), f"{lo:.3g}", fill=(90, 90, 90))
        for s, colour in series:
            s = np.asarray(s, dtype=float)
            if len(s) < 2:
                continue
            xs = x0 + np.arange(len(s)) * w / (len(s) - 1)
            ys = y0 + h - (s - lo) / (hi - lo) * h
            draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colour, width=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
