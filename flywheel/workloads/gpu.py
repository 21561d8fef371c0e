"""How a workload failed, told to the orchestrator by exit code: transient GPU trouble is worth a retry,
a bad config or bad input is not (it would fail the same way again).

Standard library only: imported by the workloads (no dagster) and by the Dagster layer.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1           # a bug or an unexpected failure: not retried
EXIT_TRANSIENT_GPU = 75  # EX_TEMPFAIL: out of memory, ECC, launch failure, busy device: retried
EXIT_CONFIG = 78         # EX_CONFIG: invalid config or input: not retried

# Messages of CUDA failures that a retry (after the device is freed or reset) can get past.
TRANSIENT_GPU_MESSAGES = (
    "cuda out of memory",
    "outofmemoryerror",
    "cuda error: out of memory",
    "uncorrectable ecc error",
    "ecc error",
    "unspecified launch failure",
    "an illegal memory access was encountered",
    "cuda-capable device(s) is/are busy or unavailable",
    "cuda error: unknown error",
    "cublas_status_alloc_failed",
    "cublas_status_execution_failed",
    "cudnn_status_execution_failed",
    "cudnn_status_alloc_failed",
    "nccl error",
    "cudaerrorlaunchfailure",
)

CONFIG_ERROR_TYPES = ("FlywheelError", "ValidationError", "ConfigError", "IngestError", "ValueError", "TypeError",
                      "FileNotFoundError", "NotADirectoryError", "KeyError")


def is_transient_gpu_error(text: str) -> bool:
    text = text.lower()
    return any(m in text for m in TRANSIENT_GPU_MESSAGES)


def exit_code_for(exc: BaseException) -> int:
    """EXIT_TRANSIENT_GPU, EXIT_CONFIG or EXIT_ERROR for an exception raised by a stage."""
    if is_transient_gpu_error(f"{type(exc).__name__}: {exc}"):
        return EXIT_TRANSIENT_GPU
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & set(CONFIG_ERROR_TYPES):
        return EXIT_CONFIG
    return EXIT_ERROR


def describe_exit(code: int) -> str:
    return {
        EXIT_OK: "ok",
        EXIT_TRANSIENT_GPU: "transient GPU error (retried)",
        EXIT_CONFIG: "invalid config or input (not retried: fix the config and run again)",
    }.get(code, "failed (not retried)")
