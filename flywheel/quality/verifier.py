"""Verifiers: domain checks that a generated clip and its pseudo-actions agree with the world's physics.
A domain plugs one in by implementing `Verifier`; its scores join the filter stack as the "verifier"
filter (each score is an "at most" statistic, calibrated on real episodes replayed with their true actions).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Verifier(Protocol):
    name: str

    def verify(self, source: dict, frames: np.ndarray, actions: np.ndarray, fps: float) -> dict[str, float]:
        """Scores for one clip (larger = less consistent). `source`: what the domain needs to put its
        simulator in the clip's starting state (e.g. the source episode's recorded initial state)."""
        ...
