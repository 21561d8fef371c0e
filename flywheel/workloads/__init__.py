"""GPU workload entrypoints: the heavy stages as plain processes.

    python -m flywheel.workloads.train --home .flywheel --config-json '{"latent_cache": "...", "train": {...}}'

Each module runs one core stage (`flywheel.stages`). Launched by Dagster Pipes (a subprocess on this
machine or a Kubernetes pod with `nvidia.com/gpu`), it streams logs, progress and the final
materialization back to Dagster; run by hand it prints progress and the result as JSON. Workloads import
`dagster_pipes` only, never `dagster`, so a GPU image needs no orchestrator.

`train` and `generate` also run on several GPUs of one host, one process per GPU under torchrun:

    torchrun --standalone --nproc-per-node 8 -m flywheel.workloads.train --home H --config-json '{...}'

Every rank runs the same stage (data-parallel training, generation requests split over ranks); rank 0
writes the artifact and alone reports to Dagster Pipes or prints the result.
"""

WORKLOADS = ("clips", "train", "evaluate", "generate")
MULTI_GPU_WORKLOADS = ("train", "generate")  # may run as several processes under torchrun
