"""The `flywheel` resource: where the flywheel home is, how many GPUs there are, and the run's config.

Configured from the environment when the definitions load (FLYWHEEL_HOME, FLYWHEEL_INBOX, FLYWHEEL_GPUS,
FLYWHEEL_GPUS_PER_STEP, FLYWHEEL_EXECUTOR, FLYWHEEL_MLFLOW_URI / MLFLOW_TRACKING_URI, FLYWHEEL_CONFIG: a YAML
merged over the defaults) and editable per run in the Launchpad (`resources: flywheel: config: run: ...`).
`flywheel iterate` launches the same job with its config (defaults, your YAML, --set) as that `run` value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from flywheel.defs.config import run_settings_class
from flywheel.store import resolve_home

RunSettings = run_settings_class()


def detected_gpus() -> int:
    """NVIDIA GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else the /dev/nvidiaN devices (no CUDA
    initialisation, so a Dagster code server never holds a GPU)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len([p for p in Path("/dev").glob("nvidia[0-9]*")])


class FlywheelResource(dg.ConfigurableResource):
    """The flywheel home and the settings every stage shares (one model per run, so stages agree)."""

    home: str = Field(description="flywheel home: the artifact store every asset writes to")
    inbox: str = Field("", description="folder watched for new LeRobot datasets (one sub-folder per domain); "
                                        "'' = <home>/inbox")
    mlflow_tracking_uri: str = Field("", description="MLflow tracking URI for lineage; '' = the local store in the home")
    gpus: int = Field(0, ge=0, description="GPUs on this machine (FLYWHEEL_GPUS, else detected): the `gpu` pool "
                                           "limit; 0 = none: GPU stages run in the step process, one at a time")
    gpus_per_step: int = Field(1, ge=1, description="GPUs of one train / generate step: > 1 runs the workload under "
                                                    "torchrun, one process per GPU (data-parallel training: "
                                                    "train.batch_size is the global batch and must be a multiple; "
                                                    "generation: videos split over the GPUs). With gpus=0: that "
                                                    "many CPU processes (gloo), for tests")
    executor: Literal["multiprocess", "k8s"] = Field("multiprocess", description="set at load time (FLYWHEEL_EXECUTOR)")
    inbox_settle_seconds: float = Field(10.0, ge=0, description="the sensor waits until a dataset in the inbox "
                                                                "has not changed for this long (a copy in progress)")
    run: RunSettings = Field(default_factory=RunSettings, description="the run's config: every stage's section and "
                                                                       "the gates (flywheel config)")

    @property
    def home_path(self) -> Path:
        return resolve_home(self.home)

    @property
    def inbox_path(self) -> Path:
        return Path(self.inbox).expanduser().resolve() if self.inbox else self.home_path / "inbox"

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        from flywheel.store import ArtifactStore

        ArtifactStore(self.home_path).sweep()  # temp and scratch dirs of writers that are gone

    def flywheel_config(self, domain: str):
        """The validated flywheel.config.FlywheelConfig of this run and domain (errors name the Launchpad field)."""
        return self.run.to_core(home=str(self.home_path), domain=domain)

    @classmethod
    def from_env(cls) -> "FlywheelResource":
        executor = os.environ.get("FLYWHEEL_EXECUTOR", "multiprocess")
        if executor not in ("multiprocess", "k8s"):
            raise ValueError(f"FLYWHEEL_EXECUTOR={executor!r}: use multiprocess or k8s")
        run = {}
        if os.environ.get("FLYWHEEL_CONFIG"):  # the operator's YAML, merged over the defaults, as the Launchpad's default
            from flywheel.config import load_config

            run = load_config(os.environ["FLYWHEEL_CONFIG"]).model_dump(mode="json", exclude={"home", "domain"})
        return cls(
            run=RunSettings(**run) if run else RunSettings(),
            home=str(resolve_home()),
            inbox=os.environ.get("FLYWHEEL_INBOX", ""),
            mlflow_tracking_uri=os.environ.get("FLYWHEEL_MLFLOW_URI", os.environ.get("MLFLOW_TRACKING_URI", "")),
            gpus=int(os.environ["FLYWHEEL_GPUS"]) if os.environ.get("FLYWHEEL_GPUS") else detected_gpus(),
            gpus_per_step=int(os.environ.get("FLYWHEEL_GPUS_PER_STEP", "1")),
            executor=executor,
        )
