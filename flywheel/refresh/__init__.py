"""Dataset refresh: real + accepted synthetic episodes as a new immutable LeRobot v3.0 version, and the
usefulness report that gates it."""

from flywheel.refresh.config import RefreshConfig, UsefulnessConfig
from flywheel.refresh.dataset import SyntheticEpisode, load_refreshed, refresh_dataset, version_id
from flywheel.refresh.provenance import read_provenance
from flywheel.refresh.usefulness import UsefulnessResult, usefulness_report

__all__ = ["RefreshConfig", "UsefulnessConfig", "SyntheticEpisode", "load_refreshed", "refresh_dataset", "version_id",
           "read_provenance", "UsefulnessResult", "usefulness_report"]
