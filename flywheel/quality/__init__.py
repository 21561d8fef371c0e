"""Quality filter stack for generated clips: cheap statistics first, thresholds calibrated on real data,
every score and reason kept; corrupted real clips to measure the filters; domain verifiers (PushT replay).
Names are resolved on first use so that reading a config does not import torch.
"""

import importlib

_EXPORTS = {
    "Clip": "flywheel.quality.calibration",
    "Thresholds": "flywheel.quality.calibration",
    "calibrate": "flywheel.quality.calibration",
    "real_clips": "flywheel.quality.calibration",
    "FILTER_VERSION": "flywheel.quality.config",
    "FilterConfig": "flywheel.quality.config",
    "FILTERS": "flywheel.quality.filters",
    "filter_clips": "flywheel.quality.filters",
    "run_filters": "flywheel.quality.filters",
    "score_clips": "flywheel.quality.filters",
    "make_validation_clips": "flywheel.quality.validation",
    "save_report": "flywheel.quality.validation",
    "validate_filters": "flywheel.quality.validation",
    "Verifier": "flywheel.quality.verifier",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flywheel.quality' has no attribute {name!r}")
