"""Workload entrypoints: a flywheel stage as a plain process (what Dagster Pipes launches for GPU steps).

    python -m flywheel.workloads.stage --stage adapter --home .flywheel --config-json '{"inputs": {...}, "config": {...}}'

`flywheel.workloads.stage` runs any stage of flywheel.pipeline.STAGES: `inputs` are the upstream results
(as their materialization metadata), `config` the run's whole FlywheelConfig. Launched by Dagster Pipes (a
subprocess on this machine or a Kubernetes pod with `nvidia.com/gpu`), it streams logs, progress and the
final materialization back to Dagster; run by hand it prints progress and the result as JSON. Workloads
import `dagster_pipes` only, never `dagster`, so a GPU image needs no orchestrator.

Stages marked `multi_gpu` (adapter, synthetic_videos) also run on several GPUs of one host, one process per
GPU under torchrun:

    torchrun --standalone --nproc-per-node 8 -m flywheel.workloads.stage --stage adapter --home H --config-json '{...}'

Every rank runs the same stage (data-parallel training, generation requests split over ranks); rank 0
writes the artifact and alone reports to Dagster Pipes or prints the result.
"""
