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
    """NVIDIA GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else the /dev/nvidiaN devices, else what
    `nvidia-smi -L` lists (containers may expose the GPU without /dev/nvidiaN). No CUDA initialisation, so a
    Dagster code server never holds a GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    devices = len([p for p in Path("/dev").glob("nvidia[0-9]*")])
    return devices or _nvidia_smi_gpus()


def _nvidia_smi_gpus() -> int:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in listed.splitlines())


class FlywheelResource(dg.ConfigurableResource):
    """The flywheel home and the settings every stage shares (one model per run, so stages agree)."""

    home: str = Field(description="flywheel home: the artifact store every asset writes to")
    # Machine facts (GPUs, inbox, MLflow server) left unset are read from the step process's environment when
    # used: a run config that names this resource (every CLI and Launchpad run does) replaces the values it
    # was built with by the fields' defaults, so defaults must mean "this machine's", never "none".
    inbox: str = Field("", description="folder watched for new LeRobot datasets (one sub-folder per domain); "
                                        "'' = FLYWHEEL_INBOX, else <home>/inbox")
    mlflow_tracking_uri: str = Field("", description="MLflow tracking URI for lineage; '' = FLYWHEEL_MLFLOW_URI / "
                                                      "MLFLOW_TRACKING_URI, else the local store in the home")
    gpus: int | None = Field(None, ge=0, description="GPUs on this machine: the `gpu` pool limit; 0 = none: GPU "
                                                     "stages run in the step process, one at a time; unset = "
                                                     "FLYWHEEL_GPUS, else detected")
    gpus_per_step: int | None = Field(None, ge=1, description="GPUs of one train / generate step (unset = "
                                                    "FLYWHEEL_GPUS_PER_STEP, else 1): > 1 runs the workload under "
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
        inbox = self.inbox or os.environ.get("FLYWHEEL_INBOX", "")
        return Path(inbox).expanduser().resolve() if inbox else self.home_path / "inbox"

    @property
    def gpu_count(self) -> int:
        if self.gpus is not None:
            return self.gpus
        return int(os.environ["FLYWHEEL_GPUS"]) if os.environ.get("FLYWHEEL_GPUS") else detected_gpus()

    @property
    def step_gpu_count(self) -> int:
        if self.gpus_per_step is not None:
            return self.gpus_per_step
        return int(os.environ.get("FLYWHEEL_GPUS_PER_STEP") or 1)

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or os.environ.get("FLYWHEEL_MLFLOW_URI", os.environ.get("MLFLOW_TRACKING_URI", ""))

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
            executor=executor,
        )
