"""Quality filter stack for generated clips: cheap statistics first, thresholds calibrated on real data,
every score and reason kept; corrupted real clips to measure the filters; domain verifiers (PushT replay)."""

from flywheel.quality.calibration import Clip, Thresholds, calibrate, real_clips
from flywheel.quality.config import FILTER_VERSION, FilterConfig
from flywheel.quality.filters import FILTERS, filter_clips, run_filters, score_clips
from flywheel.quality.validation import make_validation_clips, save_report, validate_filters
from flywheel.quality.verifier import Verifier

__all__ = ["Clip", "Thresholds", "calibrate", "real_clips", "FILTER_VERSION", "FilterConfig", "FILTERS", "filter_clips",
           "run_filters", "score_clips", "make_validation_clips", "save_report", "validate_filters", "Verifier"]
