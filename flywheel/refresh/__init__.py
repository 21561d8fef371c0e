"""Dataset refresh: real + accepted synthetic episodes as a new immutable LeRobot v3.0 version, and the
usefulness report that gates it.
Names are resolved on first use so that reading a config does not import torch.
"""

import importlib

_EXPORTS = {
    "RefreshConfig": "flywheel.refresh.config",
    "UsefulnessConfig": "flywheel.refresh.config",
    "SyntheticEpisode": "flywheel.refresh.dataset",
    "add_is_synthetic": "flywheel.refresh.dataset",
    "load_refreshed": "flywheel.refresh.dataset",
    "refresh_dataset": "flywheel.refresh.dataset",
    "version_id": "flywheel.refresh.dataset",
    "read_provenance": "flywheel.refresh.provenance",
    "UsefulnessResult": "flywheel.refresh.usefulness",
    "usefulness_report": "flywheel.refresh.usefulness",
    "VERDICTS": "flywheel.refresh.usefulness",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flywheel.refresh' has no attribute {name!r}")
