"""Verifiers: domain checks that a generated clip and its pseudo-actions agree with the world's physics.
A domain plugs one in by implementing `Verifier`; its scores join the filter stack as the "verifier"
filter, calibrated on real clips labelled and replayed the same way. Each score is an "at most" statistic
unless the verifier's `directions` (or `AT_LEAST` here) says "min".
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


# Verifier scores where larger is better (e.g. the task progress a replay makes).
AT_LEAST = {"sim_progress", "replay_block_overlap"}
# The task progress a replay makes: a usefulness criterion the user states (FilterConfig.min_progress), not a
# defect statistic, so never calibrated. Real demonstrations lose progress too (PushT: held-out clips whose
# recorded actions lose 0.45-0.51 of the goal's coverage), and on the quality benchmark it carried no signal
# about defects (point-biserial r = +0.03, p = 0.12); a calibrated threshold only rejected clean clips.
PROGRESS_STAT = "sim_progress"


@runtime_checkable
class Verifier(Protocol):
    name: str

    def verify(self, source: dict, frames: np.ndarray, actions: np.ndarray, fps: float) -> dict[str, float]:
        """Scores for one clip (larger = less consistent). `source`: what the domain needs to put its
        simulator in the clip's starting state (e.g. the source episode's recorded initial state)."""
        ...
