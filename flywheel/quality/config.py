"""Config of the quality filter stack. Bump FILTER_VERSION whenever a statistic's definition changes:
thresholds and validation reports are stored with it, and thresholds of another version are refused."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Bumped when what a calibration means changes, so thresholds of an older version are calibrated again
# (3: task progress is no longer calibrated; it gates only against min_progress; 4: local order counts the
# change that motion explains).
FILTER_VERSION = "4"


class FilterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    analysis_size: int = Field(64, ge=16, le=512, description="every clip is resized to this square before scoring")
    min_frames: int = Field(8, ge=2, description="decode filter: fewer frames than this is a failed generation")
    expected_hw: tuple[int, int] | None = Field(None, description="decode filter: required (height, width), if any")
    static_eps: float = Field(1.0, gt=0, description="a step whose largest 8x8-block mean |frame diff| (gray levels) is "
                              "below this (or below still_factor x the codec's own change on a still clip) is still")
    still_factor: float = Field(1.5, ge=1, description="see static_eps")
    percentile_lo: float = Field(1.0, ge=0, le=50, description="'at least' thresholds start at this real percentile")
    percentile_hi: float = Field(99.0, ge=50, le=100, description="'at most' thresholds start at this real percentile")
    slack: float = Field(0.75, ge=0, description="widen each threshold by at least slack x (percentile - median) of the real data")
    max_slack: float = Field(4.0, ge=0, description="... and at most this: see held_out_rejection")
    held_out_rejection: float = Field(
        0.02, ge=0, le=1, description="each threshold gets the smallest slack at which, calibrated without one real "
        "episode, it rejects at most this share of that episode's clips (leave one episode out)")
    stack_held_out_rejection: float = Field(
        0.01, ge=0, le=1, description="then the stack as a whole: while its thresholds calibrated without each episode "
        "reject more than this share of the clips (a clip is rejected by any check), the check whose widening frees "
        "the most of them is widened (up to stack_max_slack); below the 3 % a user should see on new episodes, "
        "since a few calibration episodes estimate it loosely")
    stack_max_slack: float = Field(
        2.0, ge=0, description="the stack-level widening (see stack_held_out_rejection) takes no check beyond this slack: "
        "further out a check stops seeing what it is for (G1: unexplained_change at slack 3 let half of the weak "
        "vanishes through to free one real clip)")
    min_fraction_of_low: float = Field(0.5, ge=0, le=1, description="'at least' thresholds are at least this x the real low percentile")
    floors: dict[str, float] = Field(
        default_factory=lambda: {"action_range": 2.0, "clipped_increase": 0.02},
        description="'at most' thresholds never go below these (stats that are ~0 on every real clip)",
    )
    # A generated video is decoded by the model's VAE, so it carries the codec's blur in every frame, the
    # first included; a threshold calibrated on raw real frames then rejects the codec rather than the
    # generation (measured on tiny-pusht: every video failed first-frame PSNR and sharpness, with the same
    # values for base and adapter). "model_codec" passes the real calibration clips through the same VAE
    # (encode, decode) first, so the thresholds judge what the generator adds.
    calibrate_on: Literal["real", "model_codec"] = Field(
        "real", description="real: raw held-out real clips; model_codec: the same clips after the base model's VAE")
    train_clips: int = Field(
        48, ge=0, description="the video statistics are calibrated on up to this many clips of the domain's training "
        "episodes too, evenly spread over them (their labels and replays are not: the IDM was trained on them); more "
        "episodes show more of the real variation (measured on held-out G1 episodes: clean false rejection 2.2 -> "
        "1.1 %, held-out-family recall 88.8 -> 92.7 %; see docs/quality.md); 0 = the held-out episodes only")
    min_codec_psnr: float = Field(
        15.0, ge=0, description="model_codec: a codec whose round trip of the real clips is below this PSNR (dB) "
        "cannot render the domain; calibrate on the raw clips instead (recorded in thresholds.notes)")
    min_progress: float | None = Field(
        None, description="simulator domains: reject a trajectory whose replayed task progress over the clip (PushT: "
        "change of the block's coverage of the goal) is below this, e.g. 0.0 = no progress or backwards; None: progress "
        "is recorded for every trajectory but does not gate (real demonstrations lose progress too)")
    overrides: dict[str, float] = Field(default_factory=dict, description="stat -> threshold, replaces the calibrated one")
    duplicate_max_hamming: int = Field(8, ge=0, le=128, description="perceptual-hash distance (of 128 bits) at or below which two clips of one group are duplicates")
    disabled: list[str] = Field(default_factory=list, description="filters to skip, by name")
