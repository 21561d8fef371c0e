"""A domain's simulator (flywheel.simulation): the built-in PushT one is found from the dataset alone, and a
domain of your own plugs in through the `flywheel.simulations` entry point group the same way."""

from __future__ import annotations

import importlib
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from flywheel.errors import ConfigError
from flywheel.policy.compare import can_evaluate
from flywheel.policy.config import RolloutConfig
from flywheel.pusht import PUSHT
from flywheel.quality.verifier import Verifier
from flywheel.simulation import DomainSimulation, generated_clip_start, simulation_for

REPO = Path(__file__).resolve().parents[1]
PUSHT_ROTATED = REPO / "datasets" / "pusht_rotated"
G1 = REPO / "datasets" / "g1_pick_bottle"


def test_pusht_is_found_from_its_record_and_g1_has_no_simulator():
    assert isinstance(PUSHT, DomainSimulation)
    assert simulation_for(PUSHT_ROTATED) is PUSHT
    assert simulation_for(G1) is None
    assert not can_evaluate(G1) and can_evaluate(PUSHT_ROTATED)
    assert isinstance(PUSHT.verifier(PUSHT_ROTATED), Verifier)
    assert PUSHT.policy_evaluator(PUSHT_ROTATED, RolloutConfig()).name == "pusht-sim[rotated]"


def test_a_generated_clip_starts_where_its_source_clip_starts():
    """Clip ids carry the start frame in clip fps (`-f<frame>`); the record's lead-in is the episode's own
    recorded actions up to that frame of the dataset's fps. A synthetic source episode has no start."""
    start = generated_clip_start(PUSHT, PUSHT_ROTATED, 10.0, "pusht-rotated/3", "pusht-rotated/3-f8", 16.0)
    assert len(start["initial_state"]) == 5 and start["lead_in"].shape == (5, 2)  # 8 frames at 16 fps = 5 at 10
    assert generated_clip_start(PUSHT, PUSHT_ROTATED, 10.0, "synthetic/ab12", "synthetic/ab12-f0", 16.0) is None
    features = PUSHT.replayed_features(start, np.full((17, 2), 256.0), 16.0)
    assert features["observation.environment_state"].shape == (17, 5)


PLUGIN = '''
from pathlib import Path

from flywheel.pusht import PUSHT


class MirrorCell:
    """A user's cell, recorded in (for this test) the PushT world under its own record file."""

    name = "mirror-cell"
    sidecar_files = ("meta/mirror_cell.json",)

    def recorded(self, dataset_root):
        return (Path(dataset_root) / "meta" / "mirror_cell.json").is_file()

    def verifier(self, dataset_root):
        return PUSHT.verifier(PUSHT_ROOT)

    def clip_start(self, dataset_root, episode_index, frame):
        return PUSHT.clip_start(PUSHT_ROOT, episode_index, frame)

    def replayed_features(self, start, actions, fps):
        return PUSHT.replayed_features(start, actions, fps)

    def policy_evaluator(self, dataset_root, rollout):
        return PUSHT.policy_evaluator(PUSHT_ROOT, rollout)


SIMULATION = MirrorCell()
NOT_A_SIMULATION = object()
'''


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A real installed distribution (a .dist-info with entry_points.txt on sys.path), as pip would leave it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "mirror_cell_sim.py").write_text(f"PUSHT_ROOT = {str(PUSHT_ROTATED)!r}\n" + textwrap.dedent(PLUGIN))
    dist = site / "mirror_cell-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mirror-cell\nVersion: 0.1\n")
    entry = dist / "entry_points.txt"
    entry.write_text("[flywheel.simulations]\nmirror = mirror_cell_sim:SIMULATION\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield entry
    sys.modules.pop("mirror_cell_sim", None)


def test_a_users_simulation_plugs_in_through_the_entry_point(installed_plugin, tmp_path):
    cell = tmp_path / "cell"
    shutil.copytree(G1, cell)
    assert simulation_for(cell) is None
    (cell / "meta" / "mirror_cell.json").write_text("{}")
    found = simulation_for(cell)
    assert found is not None and found.name == "mirror-cell"
    assert can_evaluate(cell)
    assert simulation_for(PUSHT_ROTATED) is PUSHT  # the built-in one still comes first for its own data

    installed_plugin.write_text("[flywheel.simulations]\nbroken = mirror_cell_sim:NOT_A_SIMULATION\n")
    importlib.invalidate_caches()
    with pytest.raises(ConfigError, match="'broken'.*lacks the members"):
        simulation_for(cell)
