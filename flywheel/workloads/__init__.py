"""GPU workload entrypoints: the heavy stages as plain processes.

    python -m flywheel.workloads.train --home .flywheel --config-json '{"latent_cache": "...", "train": {...}}'

Each module runs one core stage (`flywheel.stages`). Launched by Dagster Pipes (a subprocess on this
machine or a Kubernetes pod with `nvidia.com/gpu`), it streams logs, progress and the final
materialization back to Dagster; run by hand it prints progress and the result as JSON. Workloads import
`dagster_pipes` only, never `dagster`, so a GPU image needs no orchestrator.
"""

WORKLOADS = ("clips", "train", "evaluate", "generate")
