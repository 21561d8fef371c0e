"""The decision rules (flywheel.decisions), each criterion with its value and threshold. The stateful parts
(registration, promotion, rollback in MLflow) are exercised in flywheel_tests/lineage and the end-to-end runs."""

from flywheel.decisions import (
    AdapterGate,
    CurationGate,
    DemonstrationsGate,
    FitGate,
    RefreshGate,
    adapter_decision,
    build_on_decision,
    curation_decision,
    demonstrations_decision,
    evaluation_sides,
    fit_decision,
)


def test_the_g1_adapter_that_was_promoted_is_refused_with_its_failing_criteria():
    """Measured on real G1 with tiny-pusht: PSNR 5.49 -> 5.93 dB, SSIM 0.080 -> 0.013, video filters 0% -> 0%.
    PSNR alone (the old rule) promoted it; SSIM says the adapter made the video worse."""
    candidate, base = evaluation_sides({"psnr_adapter": 5.93, "psnr_base": 5.49, "ssim_adapter": 0.013,
                                        "ssim_base": 0.080, "video_filter_pass_rate_adapter": 0.0,
                                        "video_filter_pass_rate_base": 0.0})
    decision = adapter_decision(candidate, base, None, AdapterGate(), "flywheel-g1 v1")
    assert not decision.passed
    assert [c.name for c in decision.failed] == ["SSIM drop vs base"]
    assert "SSIM drop vs base 0.067 (needs <= 0.01)" in decision.line()
    assert decision.outcome.startswith("refused: champion stays none")


def test_every_criterion_can_fail_and_the_champion_is_compared():
    gate = AdapterGate(min_psnr_gain_db=0.5, max_ssim_drop=0.0, max_filter_pass_rate_drop=0.0,
                       max_psnr_drop_vs_champion_db=0.2)
    base = {"psnr": 24.0, "ssim": 0.85, "filter_pass_rate": 0.75}
    good = {"psnr": 25.2, "ssim": 0.87, "filter_pass_rate": 1.0}
    assert adapter_decision(good, base, {"psnr": 25.3, "ssim": 0.9}, gate, "v2", "v1").passed
    cases = {
        "PSNR gain over base": {"psnr": 24.3, "ssim": 0.87, "filter_pass_rate": 1.0},
        "SSIM drop vs base": {"psnr": 25.2, "ssim": 0.84, "filter_pass_rate": 1.0},
        "filter pass-rate drop vs base": {"psnr": 25.2, "ssim": 0.87, "filter_pass_rate": 0.5},
    }
    for name, candidate in cases.items():
        decision = adapter_decision(candidate, base, None, gate, "v2")
        assert [c.name for c in decision.failed] == [name], name
    behind = adapter_decision(good, base, {"psnr": 25.5}, gate, "v3", "v2")
    assert [c.name for c in behind.failed] == ["PSNR drop vs champion v2"]
    assert behind.outcome == "refused: champion stays v2"
    # equal to the base is not better than the base
    assert not adapter_decision(dict(base), base, None, AdapterGate(), "v4").passed
    # a NaN metric never passes
    assert not adapter_decision({"psnr": float("nan"), "ssim": 0.9}, {"psnr": 20.0, "ssim": 0.8}, None,
                                AdapterGate(), "v5").passed


def test_model_fit_names_the_preset_the_measurement_and_what_to_do():
    fits = fit_decision({"psnr_db": 24.75, "ssim": 0.88}, FitGate(), "tiny-pusht", "pusht-rotated clips")
    assert fits.passed
    g1 = fit_decision({"psnr_db": 5.91, "ssim": -0.003}, FitGate(), "tiny-pusht", "g1 clips")
    assert not g1.passed and {c.name for c in g1.failed} == {"VAE round-trip PSNR", "VAE round-trip SSIM"}
    message = g1.line()
    for words in ("tiny-pusht cannot represent this video", "5.9 dB", "cosmos-predict2.5-2b", "gates.fit.enabled"):
        assert words in message, words


def test_demonstrations_and_curation_bounds():
    ok = demonstrations_decision({"episodes": 10, "splits": {"train": 8, "val": 2}}, DemonstrationsGate(), "d")
    assert ok.passed
    no_val = demonstrations_decision({"episodes": 3, "splits": {"train": 3, "val": 0}}, DemonstrationsGate(), "d")
    assert [c.name for c in no_val.failed] == ["val episodes"]
    gate = CurationGate(min_pass_rate=0.05, max_pass_rate=0.9)
    assert curation_decision({"pass_rate": 0.25, "accepted": 2, "clips": 8}, gate, "c").passed
    kept = curation_decision({"pass_rate": 0.25, "accepted": 2, "clips": 8, "held_out_false_rejection": 0.0128}, gate, "c")
    assert kept.outcome == ("2 of 8 trajectories go into the refresh; the filters reject 1.3% of real clips of "
                            "episodes they were calibrated without")
    assert "keep almost nothing" in curation_decision({"pass_rate": 0.0}, gate, "c").outcome
    assert "not filtering" in curation_decision({"pass_rate": 1.0}, gate, "c").outcome
    assert not curation_decision({}, gate, "c").passed  # no pass rate reported is not a pass


def test_build_on_only_what_helped_or_did_no_harm():
    gate = RefreshGate()
    for verdict, passed in (("better", True), ("non-inferior", True), ("inconclusive", False), ("worse", False)):
        decision = build_on_decision({"synthetic_episodes": 2, "usefulness_verdict": verdict}, True, gate, "v")
        assert decision.passed is passed, verdict
    assert not build_on_decision({"synthetic_episodes": 2}, True, gate, "v").passed  # no evidence: not built on
    assert build_on_decision({"synthetic_episodes": 0}, True, gate, "v").passed  # = the real data
    assert not build_on_decision({"synthetic_episodes": 0}, False, gate, "v").passed  # does not load
