"""PushT, the embedded sample domain: everything flywheel knows about it that is not a LeRobot dataset.

- `sample`: writes the sample datasets (gym-pusht driven by a scripted pusher, seen through a variant's camera)
  and their `meta/pusht_sample.json` (generator config, every episode's reset seed and initial state);
- `replay`: the verifier (replay a clip's pseudo-actions in the simulator, compare with the video);
- `simulator` and `evaluator`: closed-loop rollouts of a trained policy through the domain's camera;
- `pretrain`: the recipe that trained the `tiny-pusht` model preset's weights.

`PUSHT` is its `flywheel.simulation.DomainSimulation`: the one object the rest of flywheel asks. A robot domain
of your own plugs in the same way (see flywheel/simulation.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

INFO_FILE = "meta/pusht_sample.json"


class PushTSimulation:
    name = "pusht"
    sidecar_files = (INFO_FILE,)

    def recorded(self, dataset_root: Path) -> bool:
        return (Path(dataset_root) / INFO_FILE).is_file()

    def verifier(self, dataset_root: Path):
        from flywheel.pusht.replay import PushTReplayVerifier

        return PushTReplayVerifier.for_dataset(dataset_root)

    def clip_start(self, dataset_root: Path, episode_index: int, frame: int) -> dict | None:
        from flywheel.pusht.replay import clip_source

        return clip_source(dataset_root, episode_index, frame)

    def replayed_features(self, start: dict, actions: np.ndarray, fps: float) -> dict[str, np.ndarray]:
        from flywheel.pusht.replay import PushTReplayVerifier

        return {"observation.environment_state": PushTReplayVerifier().environment_states(start, actions, fps)}

    def policy_evaluator(self, dataset_root: Path, rollout):
        from flywheel.pusht.evaluator import SimulatorEvaluator
        from flywheel.pusht.simulator import PushTSimulator

        return SimulatorEvaluator(PushTSimulator.from_dataset(dataset_root), rollout)


PUSHT = PushTSimulation()
