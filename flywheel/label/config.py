"""Configs for the inverse-dynamics model (IDM) and for labelling videos with it. Configs are data."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class IdmConfig(BaseModel):
    """How to train an IDM: two frames (t, t+k) -> the k actions between them.

    The budget is a number of gradient steps (not epochs) so that runs on datasets of different sizes
    (real-only vs real + synthetic) can be compared at the same cost.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    image_size: int = Field(64, ge=16, le=256, description="internal square resolution; every frame is resized to it")
    frame_gap: int = Field(4, ge=1, le=64, description="k: frames between the two inputs, at the dataset's fps")
    width: int = Field(32, ge=4, le=256, description="channels of the first conv layer (doubles twice)")
    steps: int = Field(600, ge=1, description="gradient steps (the training budget)")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    augment_shift: int = Field(4, ge=0, description="random translation in pixels, same for both frames")
    codec_augment: bool = Field(
        True, description="also train on the training episodes as the world model's codec renders them (the IDM "
        "labels generated videos, which that codec decodes; measured on held-out PushT clips through tiny-pusht's "
        "VAE: label MAE 34.0 -> 22.7; see docs/quality.md). Only where a codec is given and renders the domain")
    codec_min_psnr: float = Field(
        15.0, ge=0, description="codec_augment: a codec whose round trip of the training episodes is below this "
        "PSNR (dB) cannot render the domain; the IDM then trains on the real frames only (recorded in metrics.json)")
    camera_key: str | None = Field(None, description="video feature to read; default: the dataset's first camera")
    action_key: str = "action"
    episodes: list[int] | None = Field(None, description="episodes to use (train + val); default: all")
    val_episodes: list[int] | None = Field(None, description="held-out episodes; default: the last val_fraction")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    device: str = "cpu"
    plot_dims: int = Field(6, ge=1, le=32, description="action dims drawn in the predicted-vs-true plot")

    @model_validator(mode="after")
    def _val_inside_episodes(self):
        if self.episodes is not None and self.val_episodes is not None:
            missing = sorted(set(self.val_episodes) - set(self.episodes))
            if missing:
                raise ValueError(f"val_episodes {missing} are not in episodes; list them in both or leave episodes unset")
        return self


class LabelConfig(BaseModel):
    """How to label a video with a trained IDM (sliding window)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    stride: int = Field(1, ge=1, description="window start step; 1 = every frame, most overlap")
    batch_size: int = Field(256, ge=1)
