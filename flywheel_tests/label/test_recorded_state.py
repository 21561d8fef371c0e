"""Refreshing a PushT clip that starts mid-episode: the simulator replays the source episode's recorded
actions up to the clip start, then the pseudo-actions (real committed sample data, the real simulator)."""

from types import SimpleNamespace

import numpy as np

from flywheel_tests.conftest import REPO_ROOT
from flywheel.label.episodes import recorded_column
from flywheel.stages import _simulator_features

ROOT = REPO_ROOT / "datasets" / "pusht_rotated"


def test_mid_episode_clip_continues_the_recorded_episode():
    recorded = recorded_column(ROOT, 1, "observation.environment_state")
    actions = recorded_column(ROOT, 1, "action")
    # clip frame 16 at 16 fps = 1 s = source frame 10 at the dataset's 10 fps. Fed the episode's own
    # actions from there (resampled to 16 fps by nearest frame), the replay must retrace the recording.
    pseudo = actions[np.minimum(np.round(np.arange(17) * 10 / 16).astype(int) + 10, len(actions) - 1)]
    row = SimpleNamespace(source_clip_id="pusht_rotated-000001-f00016", source_episode_id="pusht_rotated/000001")
    states = _simulator_features(ROOT, row, pseudo, fps=16.0)["observation.environment_state"]
    assert states.shape == (17, 5)
    np.testing.assert_allclose(states[0], recorded[10], atol=1e-3)
    assert np.abs(states[-1, :4] - recorded[10 + 10, :4]).max() < 5.0  # 1 s later, within a few world pixels

    at_start = SimpleNamespace(source_clip_id="pusht_rotated-000001-f00000", source_episode_id="pusht_rotated/000001")
    np.testing.assert_allclose(_simulator_features(ROOT, at_start, pseudo, 16.0)["observation.environment_state"][0],
                               recorded[0], atol=1e-3)
    unknown = SimpleNamespace(source_clip_id="pusht_rotated-000042-f00016", source_episode_id="pusht_rotated/000042")
    assert _simulator_features(ROOT, unknown, pseudo, fps=16.0) is None
    synthetic = SimpleNamespace(source_clip_id="synthetic-f00000", source_episode_id="synthetic/0a1b/clip-3-adapter")
    assert _simulator_features(ROOT, synthetic, pseudo, fps=16.0) is None
