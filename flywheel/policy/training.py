"""Train one LeRobot policy on one LeRobot dataset version, seeded, with a fixed budget.

The same steps as LeRobot's own train script (`lerobot.scripts.lerobot_train`), without its CLI, accelerate
and checkpoint machinery: `make_policy` builds the policy from the dataset's features and stats,
`make_pre_post_processors` the normalisation pipelines, the policy's own optimizer / scheduler presets the
optimizer, `EpisodeAwareSampler` the seeded sample order, and `policy.forward` the loss. Only the input
features are narrowed (see PolicyTrainConfig.input_features) and the budget is ours.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flywheel.errors import ConfigError, DataError
from flywheel.policy.config import PolicyTrainConfig

# Policy-config fields each type gets before the user's overrides: small enough to train on a CPU in minutes
# (ACT) or LeRobot's PushT recipe (diffusion), and no pretrained backbone (nothing is downloaded).
PRESETS: dict[str, dict] = {
    "act": dict(
        chunk_size=16, n_action_steps=8, dim_model=256, n_heads=8, dim_feedforward=1024, n_encoder_layers=2,
        n_decoder_layers=1, n_vae_encoder_layers=2, pretrained_backbone_weights=None,
    ),
    "diffusion": dict(
        n_obs_steps=2, horizon=16, n_action_steps=8, drop_n_last_frames=7, crop_shape=(84, 84),
        pretrained_backbone_weights=None, use_group_norm=True,
    ),
}


@dataclass
class TrainedPolicy:
    """A LeRobot policy trained on one dataset version, with the processors it must be driven through."""

    policy: torch.nn.Module           # a lerobot PreTrainedPolicy (ACTPolicy, DiffusionPolicy)
    preprocessor: object              # lerobot PolicyProcessorPipeline: normalise, batch, to device
    postprocessor: object             # unnormalise the actions, to CPU
    dataset_root: Path
    seed: int
    steps: int
    batch_size: int
    num_episodes: int
    num_frames: int
    train_seconds: float
    losses: list[float] = field(default_factory=list)  # one per step

    def save(self, out: str | Path) -> Path:
        """Write the policy and its processors in LeRobot's format (`from_pretrained` reads them back)."""
        out = Path(out)
        self.policy.save_pretrained(out)
        self.preprocessor.save_pretrained(out)
        self.postprocessor.save_pretrained(out)
        return out

    def summary(self) -> dict:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return dict(dataset_root=str(self.dataset_root), seed=self.seed, steps=self.steps,
                    batch_size=self.batch_size, num_episodes=self.num_episodes, num_frames=self.num_frames,
                    train_seconds=round(self.train_seconds, 2), final_loss=float(np.mean(tail)) if tail else None,
                    parameters=sum(p.numel() for p in self.policy.parameters()))


class _MemoizedSamples(torch.utils.data.Dataset):
    """Each LeRobotDataset sample kept after its first decode, camera frames as uint8 (exact: LeRobot decodes
    uint8 video to float / 255). The datasets compared here are small (a few thousand frames), so decoding
    every frame again in every epoch of every training run would cost more than the training itself."""

    def __init__(self, dataset, camera_keys):
        self.dataset, self.camera_keys, self._cache = dataset, list(camera_keys), {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if index not in self._cache:
            item = dict(self.dataset[index])
            for key in self.camera_keys:
                if key in item and item[key].dtype.is_floating_point:
                    item[key] = (item[key] * 255.0).round().to(torch.uint8)
            self._cache[index] = item
        return self._cache[index]


# Decoded samples per (dataset root, delta timestamps): the runs of one comparison (every seed of an arm) share
# them. Two entries: the two arms of the comparison in progress.
_SAMPLES: dict[tuple, _MemoizedSamples] = {}
_SAMPLES_KEPT = 2


def _memoized(dataset, root: Path, delta_timestamps: dict | None) -> _MemoizedSamples:
    key = (str(root.resolve()), json.dumps(delta_timestamps, sort_keys=True), _tree_stamp(root))
    if key not in _SAMPLES:
        while len(_SAMPLES) >= _SAMPLES_KEPT:
            _SAMPLES.pop(next(iter(_SAMPLES)))
        _SAMPLES[key] = _MemoizedSamples(dataset, dataset.meta.camera_keys)
    return _SAMPLES[key]


def _tree_stamp(root: Path) -> tuple:
    """Changes when the dataset's files do (a version rewritten in place must not be served from memory)."""
    return tuple(sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in root.rglob("*") if p.is_file()))


def policy_config(config: PolicyTrainConfig, device: str):
    """The LeRobot policy config (ACTConfig / DiffusionConfig) for `config`, on `device`."""
    from lerobot.policies.factory import make_policy_config

    fields = {**PRESETS[config.type], **config.overrides}
    if config.lr is not None:
        fields.setdefault("optimizer_lr", config.lr)
        if config.type == "act":
            fields.setdefault("optimizer_lr_backbone", config.lr)
    if config.type == "diffusion":
        # The preset's warmup (500 steps) would be most of a short budget.
        fields.setdefault("scheduler_warmup_steps", min(500, config.steps // 10))
    try:
        return make_policy_config(config.type, device=device, **fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"policy.overrides / policy.type {config.type!r}: LeRobot refused the policy config: {e}") from e


def _input_features(meta, config: PolicyTrainConfig, root: Path) -> dict:
    from lerobot.utils.feature_utils import dataset_to_policy_features

    features = dataset_to_policy_features(meta.features)
    missing = [k for k in config.input_features if k not in features]
    if missing:
        raise DataError(f"{root}: policy.input_features {missing} are not features of this dataset "
                        f"(it has {sorted(k for k in features if k != 'action')}); set policy.input_features")
    return {k: features[k] for k in config.input_features}


def build_optimizer(cfg, policy) -> torch.optim.Optimizer:
    """The policy's own optimizer preset (type, lr per parameter group, betas, weight decay), with torch's fused
    kernel: the same update, about 4x faster per step on a CPU (0.25 -> 0.06 s for the CPU ACT's 15.5 M
    parameters, measured here), which matters when the budget is a few hundred steps."""
    from dataclasses import asdict

    from lerobot.optim.optimizers import AdamConfig, AdamWConfig

    preset = cfg.get_optimizer_preset()
    kinds = {AdamWConfig: torch.optim.AdamW, AdamConfig: torch.optim.Adam}
    if type(preset) not in kinds:
        return preset.build(policy.get_optim_params())
    kwargs = asdict(preset)
    kwargs.pop("grad_clip_norm")
    return kinds[type(preset)](policy.get_optim_params(), **kwargs, fused=True)


def seed_everything(seed: int) -> None:
    from lerobot.utils.random_utils import set_seed

    set_seed(seed)


def train_policy(dataset_root: str | Path, config: PolicyTrainConfig, seed: int, device: str = "cpu",
                 progress: Callable[[dict], None] | None = None, checkpoints: tuple[int, ...] = (),
                 on_checkpoint: Callable[[TrainedPolicy], None] | None = None) -> TrainedPolicy:
    """Train `config.type` on every episode of the dataset at `dataset_root` for `config.steps` steps of
    `config.batch_size` samples, from `seed` (weights, sample order, dropout / VAE / diffusion noise).
    `on_checkpoint` sees the policy (in eval mode) after each step count in `checkpoints` (a learning curve)."""
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
    from lerobot.datasets.sampler import EpisodeAwareSampler
    from lerobot.policies.factory import make_policy, make_pre_post_processors

    root = Path(dataset_root)
    if not (root / "meta" / "info.json").is_file():
        raise DataError(f"{root}: not a LeRobot dataset (no meta/info.json)")
    seed_everything(seed)
    repo_id = f"flywheel/{root.name}"
    meta = LeRobotDatasetMetadata(repo_id, root=root)
    cfg = policy_config(config, device)
    cfg.input_features = _input_features(meta, config, root)
    delta_timestamps = resolve_delta_timestamps(cfg, meta)
    dataset = LeRobotDataset(repo_id, root=root, delta_timestamps=delta_timestamps, video_backend="pyav")
    policy = make_policy(cfg, ds_meta=dataset.meta)
    preprocessor, postprocessor = make_pre_post_processors(cfg, dataset_stats=dataset.meta.stats)
    optimizer = build_optimizer(cfg, policy)
    scheduler_preset = cfg.get_scheduler_preset()
    scheduler = scheduler_preset.build(optimizer, config.steps) if scheduler_preset is not None else None
    grad_clip = cfg.get_optimizer_preset().grad_clip_norm

    sampler = EpisodeAwareSampler(
        dataset.meta.episodes["dataset_from_index"], dataset.meta.episodes["dataset_to_index"],
        episode_indices_to_use=dataset.episodes, drop_n_last_frames=getattr(cfg, "drop_n_last_frames", 0),
        shuffle=True, seed=seed, absolute_to_relative_idx=dataset.absolute_to_relative_idx)
    samples = _memoized(dataset, root, delta_timestamps) if config.cache_frames else dataset
    loader = torch.utils.data.DataLoader(samples, batch_size=config.batch_size, sampler=sampler, num_workers=0,
                                         drop_last=False)

    policy.train()
    losses: list[float] = []
    started = time.perf_counter()
    batches = _cycle(loader)
    for step in range(config.steps):
        batch = preprocessor(_float_images(next(batches), dataset.meta.camera_keys))
        loss, _ = policy.forward(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.item()))
        if progress is not None and ((step + 1) % 50 == 0 or step + 1 == config.steps):
            progress(dict(stage="policy_train", step=step + 1, steps=config.steps, loss=losses[-1]))
        if on_checkpoint is not None and step + 1 in checkpoints and step + 1 < config.steps:
            # Evaluating draws from torch's RNG (a diffusion policy's noise): put it back, so that the rest of the
            # run trains exactly as it would without the checkpoint.
            rng = torch.random.get_rng_state()
            policy.eval()
            on_checkpoint(TrainedPolicy(policy, preprocessor, postprocessor, root, seed, step + 1, config.batch_size,
                                        dataset.meta.total_episodes, dataset.meta.total_frames,
                                        time.perf_counter() - started, list(losses)))
            policy.train()
            torch.random.set_rng_state(rng)
    policy.eval()
    trained = TrainedPolicy(policy, preprocessor, postprocessor, root, seed, config.steps, config.batch_size,
                            dataset.meta.total_episodes, dataset.meta.total_frames, time.perf_counter() - started,
                            losses)
    if on_checkpoint is not None and config.steps in checkpoints:
        on_checkpoint(trained)
    return trained


def _cycle(loader):
    """Batches forever; each pass is a new epoch of the sampler's order (EpisodeAwareSampler seeds it from
    (seed, epoch) and advances the epoch itself on every pass)."""
    while True:
        yield from loader


def _float_images(batch: dict, camera_keys) -> dict:
    """As LeRobot's train loop: uint8 camera frames (image features) become float in [0, 1]."""
    for key in camera_keys:
        if key in batch and batch[key].dtype == torch.uint8:
            batch[key] = batch[key].to(dtype=torch.float32) / 255.0
    return batch
