"""The reliability suite (benchmarks/reliability.py) as tests: bad inputs through the real CLI, SIGKILL at random
moments of training and refresh, concurrent processes on one home. Slow (minutes to tens of minutes on 2 cores):
`pytest -m slow flywheel_tests/test_reliability.py`, or one case: `pytest -m slow -k data-g1-video-flipped`.
The committed table is benchmarks/results/reliability.md (`python benchmarks/reliability.py`)."""

import importlib.util
import random
import sys

import pytest

from flywheel_tests.conftest import REPO_ROOT


def _load_suite():
    spec = importlib.util.spec_from_file_location("reliability", REPO_ROOT / "benchmarks" / "reliability.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reliability"] = module
    spec.loader.exec_module(module)
    return module


suite = _load_suite()
CASES = {case.name: case for case in suite.all_cases()}


def test_the_suite_covers_60_distinct_bad_inputs_of_every_kind():
    assert len(CASES) == len(suite.all_cases()) >= 60
    kinds = {case.category for case in CASES.values()}
    assert kinds == {"data", "config", "cli", "domain", "adapter"}
    assert all(case.names for case in CASES.values()), "every case says what its message must name"


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    runner = suite.Runner()
    return root, runner, suite.Fixtures(root / "fixtures", runner)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_a_clean_error_that_leaves_nothing_behind(harness, name):
    root, runner, fixtures = harness
    result = suite.run_case(CASES[name], root / "cases", runner, fixtures, subprocess_=False)
    assert result.exit_code == 2, result.problems
    assert not result.checks["traceback"], result.problems
    assert result.clean_error, result.problems  # the message names the file / field / argument
    assert result.nothing_left, result.problems


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_bad_input_through_python_m_flywheel_cli(harness):
    """The in-process runs stand for the command a user types: one case each way, the same outcome."""
    root, runner, fixtures = harness
    case = CASES["data-g1-action-nan"]
    typed = suite.run_case(case, root / "typed", runner, fixtures, subprocess_=True)
    called = suite.run_case(case, root / "called", runner, fixtures, subprocess_=False)
    assert typed.passed and called.passed, (typed.problems, called.problems)
    assert typed.message.replace("typed", "called") == called.message


@pytest.mark.slow
@pytest.mark.multiprocess
def test_killed_training_reruns_to_the_uninterrupted_adapter(harness):
    root, runner, _ = harness
    trials = suite.train_trials(root / "kill", runner, random.Random(1), count=2)
    for trial in trials:
        assert trial.phase != "never killed (ended first)"
        assert trial.rerun_exit == 0 and trial.identical and trial.previous_intact, trial.problems
        assert not trial.leftovers and not trial.duplicate_versions, trial.problems


@pytest.mark.slow
@pytest.mark.multiprocess
def test_killed_refresh_reruns_to_the_uninterrupted_version(harness):
    root, runner, _ = harness
    (trial,) = suite.refresh_trials(root / "kill", runner, random.Random(2), count=1)
    assert trial.rerun_exit == 0 and trial.identical and trial.previous_intact, trial.problems
    assert not trial.leftovers, trial.problems


@pytest.mark.slow
@pytest.mark.multiprocess
def test_four_concurrent_trainings_on_two_domains(harness):
    root, _, _ = harness
    result = suite.concurrency(root / "concurrency")
    assert [p["exit_code"] for p in result.processes] == [0, 0, 0, 0], result.problems
    assert len(result.adapters) == result.adapter_keys == 2 and not result.duplicate_versions, result.problems
    assert result.passed, result.problems
