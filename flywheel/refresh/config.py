"""Config of the dataset refresh and of the usefulness report."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from flywheel.label.config import IdmConfig


class RefreshConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    repo_id: str = Field("flywheel/refreshed", description="repo_id written into the new dataset (never pushed)")
    camera_key: str | None = Field(None, description="camera the synthetic frames are for; default: the only one")
    state_from_actions: bool = Field(
        True, description="fill observation.state of synthetic frames with the previous pseudo-action when the "
                          "clip brings no state (action = commanded next state for position-controlled robots)")


class UsefulnessConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    idm: IdmConfig = Field(default_factory=lambda: UsefulnessConfig.default_idm(),
                           description="the model trained in both arms, same budget")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="one paired comparison per seed; fewer than 2 "
                             "gives no interval (verdict inconclusive), 3 or more for a usable one")
    margin: float = Field(0.05, ge=0, description="non-inferiority margin, a fraction of the real-only held-out "
                          "error: non-inferior when the paired difference's 95% interval straddles 0 and stays "
                          "below it (flywheel.refresh.usefulness says the whole rule)")

    @staticmethod
    def default_idm(steps: int = 600) -> IdmConfig:
        """Both arms are scored on real held-out frames and no codec is given here: no codec renderings."""
        return IdmConfig(steps=steps, codec_augment=False)
