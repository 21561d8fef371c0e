"""A domain's simulator: what flywheel asks of a domain whose demonstrations were recorded in one.

A LeRobot dataset is all flywheel needs of a domain. A domain recorded in a simulator can give more, and
flywheel uses it wherever it exists:

- `verifier(root)`: replays a clip's pseudo-actions from where the clip starts and scores whether the video
  agrees with the world (the "verifier" filter of curation; `flywheel.quality.verifier.Verifier`);
- `clip_start(root, episode_index, frame)`: the simulator state at a frame of a recorded episode, which the
  verifier and the replayed features start from (None where the dataset has no record of it);
- `replayed_features(start, actions, fps)`: per-frame features a generated video cannot carry (PushT:
  `observation.environment_state`), written into a refreshed version's synthetic episodes;
- `policy_evaluator(root, rollout)`: closed-loop evaluation of a policy trained on the domain's data
  (`flywheel.policy`; its `name` says which world, and both arms of a comparison must give the same);
- `sidecar_files`: files next to LeRobot's own metadata that every refreshed version carries over.

The built-in one is PushT (`flywheel.pusht`). Yours is an object with these members, published as a Python
entry point of group `flywheel.simulations` (in your package's pyproject: `[project.entry-points.
"flywheel.simulations"] my_cell = "my_package.sim:SIMULATION"`); the first whose `recorded(root)` is true
for a dataset is that dataset's simulation.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from flywheel.errors import ConfigError

if TYPE_CHECKING:
    from flywheel.policy.config import RolloutConfig
    from flywheel.policy.evaluators import PolicyEvaluator
    from flywheel.quality.verifier import Verifier

ENTRY_POINT_GROUP = "flywheel.simulations"


@runtime_checkable
class DomainSimulation(Protocol):
    name: str
    sidecar_files: tuple[str, ...]

    def recorded(self, dataset_root: Path) -> bool:
        """Whether this dataset (or a version refreshed from it) was recorded in this simulator."""
        ...

    def verifier(self, dataset_root: Path) -> Verifier: ...

    def clip_start(self, dataset_root: Path, episode_index: int, frame: int) -> dict | None: ...

    def replayed_features(self, start: dict, actions: np.ndarray, fps: float) -> dict[str, np.ndarray]: ...

    def policy_evaluator(self, dataset_root: Path, rollout: RolloutConfig) -> PolicyEvaluator: ...


def simulations() -> list[DomainSimulation]:
    """The built-in PushT simulation, then every one installed under the entry point group."""
    from flywheel.pusht import PUSHT

    found: list[DomainSimulation] = [PUSHT]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if not isinstance(obj, DomainSimulation):
            raise ConfigError(f"entry point {ep.name!r} ({ep.value}) of group {ENTRY_POINT_GROUP!r} is a "
                              f"{type(obj).__name__}, which lacks the members of flywheel.simulation."
                              "DomainSimulation; see that module's docstring")
        found.append(obj)
    return found


def simulation_for(dataset_root: str | Path) -> DomainSimulation | None:
    """The simulator a dataset was recorded in, or None (then nothing is replayed or rolled out)."""
    root = Path(dataset_root)
    return next((s for s in simulations() if s.recorded(root)), None)


def generated_clip_start(simulation: DomainSimulation, dataset_root: Path, dataset_fps: float,
                         source_episode_id: str, source_clip_id: str, clip_fps: float) -> dict | None:
    """The simulator start of a generated clip: its source clip's first frame. Source episode ids end in
    `/<episode index>` and clip ids in `-f<start frame>` (in clip-fps frames; flywheel.data.clips). None
    for a synthetic source episode (the simulator never recorded it)."""
    index_text = str(source_episode_id).rsplit("/", 1)[-1]
    start_text = str(source_clip_id).rsplit("-f", 1)[-1]
    if not index_text.isdigit() or not start_text.isdigit():
        return None
    source_frame = int(round(int(start_text) * float(dataset_fps) / clip_fps))
    return simulation.clip_start(dataset_root, int(index_text), source_frame)
