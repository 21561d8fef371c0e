"""The `flywheel` resource: where the flywheel home is, which model runs, how many GPUs there are.

Configured from the environment when the definitions load (FLYWHEEL_HOME, FLYWHEEL_INBOX, FLYWHEEL_GPUS,
FLYWHEEL_GPUS_PER_STEP, FLYWHEEL_EXECUTOR, MLFLOW_TRACKING_URI) and editable per run in the Launchpad (`resources: flywheel: config:`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from flywheel.defs.config import stage_settings
from flywheel.store import resolve_home

ModelSettings = stage_settings("model", "ModelSettings")


class FlywheelResource(dg.ConfigurableResource):
    """The flywheel home and the settings every stage shares (one model per run, so stages agree)."""

    home: str = Field(description="flywheel home: the artifact store every asset writes to")
    inbox: str = Field("", description="folder watched for new LeRobot datasets (one sub-folder per domain); "
                                        "'' = <home>/inbox")
    mlflow_tracking_uri: str = Field("", description="MLflow tracking URI for lineage; '' = the local store in the home")
    gpus: int = Field(1, ge=0, description="GPUs on this machine: the `gpu` pool limit (0 = CPU only, one step at a time)")
    gpus_per_step: int = Field(1, ge=1, description="GPUs of one train / generate step: > 1 runs the workload under "
                                                    "torchrun, one process per GPU (data-parallel training: "
                                                    "train.batch_size is the global batch and must be a multiple; "
                                                    "generation: videos split over the GPUs). With gpus=0: that "
                                                    "many CPU processes (gloo), for tests")
    executor: Literal["multiprocess", "k8s"] = Field("multiprocess", description="set at load time (FLYWHEEL_EXECUTOR)")
    inbox_settle_seconds: float = Field(10.0, ge=0, description="the sensor waits until a dataset in the inbox "
                                                                "has not changed for this long (a copy in progress)")
    model: ModelSettings = Field(default_factory=ModelSettings, description="the world model every stage uses")

    @property
    def home_path(self) -> Path:
        return resolve_home(self.home)

    @property
    def inbox_path(self) -> Path:
        return Path(self.inbox).expanduser().resolve() if self.inbox else self.home_path / "inbox"

    def model_config_core(self):
        """The validated flywheel.config.ModelConfig."""
        return self.model.to_core("model")

    @classmethod
    def from_env(cls) -> "FlywheelResource":
        executor = os.environ.get("FLYWHEEL_EXECUTOR", "multiprocess")
        if executor not in ("multiprocess", "k8s"):
            raise ValueError(f"FLYWHEEL_EXECUTOR={executor!r}: use multiprocess or k8s")
        return cls(
            home=str(resolve_home()),
            inbox=os.environ.get("FLYWHEEL_INBOX", ""),
            mlflow_tracking_uri=os.environ.get("FLYWHEEL_MLFLOW_URI", os.environ.get("MLFLOW_TRACKING_URI", "")),
            gpus=int(os.environ.get("FLYWHEEL_GPUS", "1")),
            gpus_per_step=int(os.environ.get("FLYWHEEL_GPUS_PER_STEP", "1")),
            executor=executor,
        )
