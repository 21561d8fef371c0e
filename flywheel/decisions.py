"""Every decision the flywheel makes, in one place, on stated criteria.

    demonstrations  enough episodes, and held-out ones, to evaluate on           -> the run goes on or stops
    model fit       the base model's VAE can represent the domain's video        -> train, or stop before training
    adapter gate    better than the base, not worse than the champion            -> promote to champion, or refuse
    generator       which adapter generates the synthetic videos                 -> champion, base or a chosen one
    curation        the share of trajectories the filters keep is plausible      -> refresh, or stop
    build on        the refreshed version loads and its synthetic data helped    -> the next iteration ingests it
    policy verdict  a policy trained on it does as well closed-loop (simulator)  -> build on, with evidence: policy

Each decision is a `Decision`: its verdict, every criterion with the measured value, the threshold and
whether it held, and who decided (an iteration, a user on the command line). The Dagster asset checks show
it, the CLI prints its line, and MLflow records it (a governance run for the adapter decisions; the stage's
run for the others). The thresholds are the `gates` section of the run config (`Gates`), so a user changes
a criterion in one place and sees it applied by the CLI, the Dagster UI and the schedule alike.

This module holds the rules; flywheel.lineage holds the MLflow mechanics they use (register a version,
move an alias, write a run). No Dagster import: the Dagster layer calls these functions and renders them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flywheel.errors import DecisionRefused

# ------------------------------------------------------------------------------------------ criteria config


class DemonstrationsGate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    min_episodes: int = Field(2, ge=1, description="fewest episodes the domain's demonstrations may have")
    min_train_episodes: int = Field(1, ge=1, description="fewest episodes in the train split")
    min_val_episodes: int = Field(1, ge=0, description="fewest held-out (val) episodes: the adapter evaluation and "
                                                       "the filter calibration use them")


class FitGate(BaseModel):
    """Can the base model represent the domain's video at all? Its VAE round-trip of real clips says."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = Field(True, description="round-trip real clips through the base model's VAE before training "
                                            "and stop when it cannot represent them")
    min_psnr_db: float = Field(20.0, description="mean VAE round-trip PSNR of the sampled real clips must reach this "
                                                 "(tiny-pusht: ~33 dB on PushT, ~6 dB on real G1 video)")
    min_ssim: float = Field(0.5, ge=-1, le=1, description="... and their mean SSIM this")
    clips: int = Field(4, ge=1, description="real clips sampled for the round-trip (held-out ones first)")


class AdapterGate(BaseModel):
    """When an adapter is promoted to champion: every criterion must hold."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    min_psnr_gain_db: float = Field(0.0, ge=0, description="PSNR against the real held-out frames must beat the base "
                                                           "model's by more than this (dB)")
    max_ssim_drop: float = Field(0.01, ge=0, description="SSIM may be below the base model's by at most this")
    max_filter_pass_rate_drop: float = Field(0.0, ge=0, le=1, description="the share of its videos the quality "
                                             "stack's video filters keep may be below the base model's by at most this")
    max_psnr_drop_vs_champion_db: float = Field(0.5, ge=0, description="PSNR may trail the domain's current "
                                                                       "champion by at most this (dB)")


class CurationGate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    min_pass_rate: float = Field(0.05, ge=0, le=1, description="below this share of kept trajectories the refresh "
                                                               "is blocked (the generator or the filters are off)")
    max_pass_rate: float = Field(1.0, ge=0, le=1, description="above this share the filters are not filtering")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_pass_rate > self.max_pass_rate:
            raise ValueError(f"min_pass_rate {self.min_pass_rate} is above max_pass_rate {self.max_pass_rate}")
        return self


UsefulnessVerdict = Literal["better", "non-inferior", "worse", "inconclusive"]


class RefreshGate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    build_on: list[UsefulnessVerdict] = Field(
        default_factory=lambda: ["better", "non-inferior"], min_length=1,
        description="usefulness verdicts (real + synthetic vs real only) on which the next iteration ingests the "
                    "refreshed version; 'inconclusive' is not evidence that the synthetic data help")
    evidence: Literal["idm", "policy"] = Field(
        "idm", description="whose usefulness verdict build_on reads: idm (the inverse-dynamics proxy, refreshed_dataset "
                           "decides) | policy (the closed-loop policy verdict, policy_evaluation decides; the IDM "
                           "proxy where no policy was evaluated: no simulator, or policy.evaluate off / auto on CPU)")


class Gates(BaseModel):
    """The criteria of every decision (the run config's `gates` section)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    demonstrations: DemonstrationsGate = Field(default_factory=DemonstrationsGate)
    fit: FitGate = Field(default_factory=FitGate)
    adapter: AdapterGate = Field(default_factory=AdapterGate)
    curation: CurationGate = Field(default_factory=CurationGate)
    refresh: RefreshGate = Field(default_factory=RefreshGate)


# ------------------------------------------------------------------------------------------------ decisions


class Criterion(BaseModel):
    """One stated criterion: `value` against `threshold` by `rule`, and whether it held."""

    name: str
    value: float | str | None
    threshold: float | str | None
    rule: str  # how value is compared, e.g. "> base + 0.0 dB"
    passed: bool

    def line(self) -> str:
        return f"{self.name} {_fmt(self.value)} (needs {self.rule})"

    @property
    def key(self) -> str:
        """The name as an MLflow metric / Dagster metadata key."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name).strip("_")


class Decision(BaseModel):
    """A verdict with its criteria and who made it."""

    name: str              # e.g. "adapter gate"
    subject: str           # what it is about, e.g. "flywheel-pusht-rotated v2"
    passed: bool
    outcome: str           # what follows, e.g. "promoted to champion", "refused: champion stays v1"
    criteria: list[Criterion] = Field(default_factory=list)
    actor: str = ""        # who decided: "iteration 3 (Dagster run 1a2b...)", "user alice via CLI"

    @property
    def failed(self) -> list[Criterion]:
        return [c for c in self.criteria if not c.passed]

    @property
    def reasons(self) -> list[str]:
        """The failing criteria, each with its value and threshold (empty when the decision passed)."""
        return [c.line() for c in self.failed]

    def line(self) -> str:
        """One line for a terminal or a check description."""
        shown = self.failed if not self.passed else self.criteria
        detail = "; ".join(c.line() for c in shown)
        return f"{self.name} {'passed' if self.passed else 'failed'}: {self.outcome}" + (f" ({detail})" if detail else "")

    def metadata(self) -> dict[str, Any]:
        """Flat numbers and texts (Dagster check metadata, MLflow tags/params)."""
        out: dict[str, Any] = {"passed": self.passed, "outcome": self.outcome, "actor": self.actor}
        for c in self.criteria:
            key = c.key
            out[key] = c.value
            out[f"{key}_threshold"] = c.threshold
            out[f"{key}_ok"] = c.passed
        return out

    def refuse(self) -> None:
        """Raise DecisionRefused with the failing criteria when the decision did not pass."""
        if not self.passed:
            raise DecisionRefused(f"{self.subject}: {self.line()}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _at_least(name: str, value: float, threshold: float, unit: str = "") -> Criterion:
    ok = value is not None and math.isfinite(value) and value >= threshold
    return Criterion(name=name, value=value, threshold=threshold, rule=f">= {_fmt(threshold)}{unit}", passed=ok)


def _at_most(name: str, value: float, threshold: float, unit: str = "") -> Criterion:
    ok = value is not None and math.isfinite(value) and value <= threshold
    return Criterion(name=name, value=value, threshold=threshold, rule=f"<= {_fmt(threshold)}{unit}", passed=ok)


# -------------------------------------------------------------------------------------------- demonstrations


def demonstrations_decision(summary: dict[str, Any], gate: DemonstrationsGate, subject: str) -> Decision:
    """Enough episodes, train and held-out ones (`summary` = the manifest's summary: episodes, splits)."""
    splits = summary.get("splits") or {}
    criteria = [
        _at_least("episodes", int(summary.get("episodes", 0)), gate.min_episodes),
        _at_least("train episodes", int(splits.get("train", 0)), gate.min_train_episodes),
        _at_least("val episodes", int(splits.get("val", 0)), gate.min_val_episodes),
    ]
    passed = all(c.passed for c in criteria)
    outcome = "enough episodes to train and hold out" if passed else (
        "too few episodes: add demonstrations or lower gates.demonstrations (a held-out split needs val_fraction > 0)")
    return Decision(name="demonstrations", subject=subject, passed=passed, outcome=outcome, criteria=criteria)


# ------------------------------------------------------------------------------------------------ model fit


def fit_decision(fit: dict[str, Any], gate: FitGate, preset: str, subject: str) -> Decision:
    """Whether the base model's VAE represents the domain's video (`fit`: psnr_db, ssim of the round-trip)."""
    criteria = [
        _at_least("VAE round-trip PSNR", float(fit["psnr_db"]), gate.min_psnr_db, " dB"),
        _at_least("VAE round-trip SSIM", float(fit["ssim"]), gate.min_ssim),
    ]
    passed = all(c.passed for c in criteria)
    if passed:
        outcome = f"{preset} represents this video"
    else:
        outcome = (f"model {preset} cannot represent this video (its VAE renders the real clips at "
                   f"{float(fit['psnr_db']):.1f} dB PSNR / {float(fit['ssim']):.3f} SSIM); nothing was trained. Choose a "
                   "model made for such video: model.preset: cosmos-predict2.5-2b (GPU) or a local diffusers "
                   "model directory; or set gates.fit.enabled: false to train anyway")
    return Decision(name="model fit", subject=subject, passed=passed, outcome=outcome, criteria=criteria)


# --------------------------------------------------------------------------------------------- adapter gate


def adapter_decision(candidate: dict[str, float], base: dict[str, float], champion: dict[str, float] | None,
                     gate: AdapterGate, subject: str, champion_label: str = "") -> Decision:
    """The adapter gate: every criterion against the base model on the same held-out clips and seeds, and
    against the current champion. `candidate`/`base`/`champion` hold psnr, ssim and (when the evaluation
    scored them) filter_pass_rate."""
    gain = candidate["psnr"] - base["psnr"]
    criteria = [Criterion(name="PSNR gain over base", value=gain, threshold=gate.min_psnr_gain_db,
                          rule=f"> {_fmt(gate.min_psnr_gain_db)} dB",
                          passed=math.isfinite(gain) and gain > gate.min_psnr_gain_db)]
    ssim_drop = base["ssim"] - candidate["ssim"]
    criteria.append(_at_most("SSIM drop vs base", ssim_drop, gate.max_ssim_drop))
    if "filter_pass_rate" in candidate and "filter_pass_rate" in base:
        drop = base["filter_pass_rate"] - candidate["filter_pass_rate"]
        criteria.append(_at_most("filter pass-rate drop vs base", drop, gate.max_filter_pass_rate_drop))
    if champion is not None and "psnr" in champion:
        criteria.append(_at_most(f"PSNR drop vs champion{' ' + champion_label if champion_label else ''}",
                                 champion["psnr"] - candidate["psnr"], gate.max_psnr_drop_vs_champion_db, " dB"))
    passed = all(c.passed for c in criteria)
    outcome = "promoted to champion" if passed else (
        f"refused: champion stays {champion_label or 'none (generation uses the base model)'}")
    return Decision(name="adapter gate", subject=subject, passed=passed, outcome=outcome, criteria=criteria)


def evaluation_sides(metrics: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """(candidate, base) gate inputs from an adapter_evaluation's metrics."""
    candidate = {"psnr": float(metrics["psnr_adapter"]), "ssim": float(metrics["ssim_adapter"])}
    base = {"psnr": float(metrics["psnr_base"]), "ssim": float(metrics["ssim_base"])}
    if "video_filter_pass_rate_adapter" in metrics and "video_filter_pass_rate_base" in metrics:
        candidate["filter_pass_rate"] = float(metrics["video_filter_pass_rate_adapter"])
        base["filter_pass_rate"] = float(metrics["video_filter_pass_rate_base"])
    return candidate, base


# ------------------------------------------------------------------------------------------------- curation


def curation_decision(meta: dict[str, Any], gate: CurationGate, subject: str) -> Decision:
    rate = meta.get("pass_rate")
    rate = float(rate) if isinstance(rate, (int, float)) else float("nan")
    criteria = [_at_least("pass rate", rate, gate.min_pass_rate), _at_most("pass rate", rate, gate.max_pass_rate)]
    criteria[1].name = "pass rate (upper bound)"
    passed = all(c.passed for c in criteria)
    accepted, clips = meta.get("accepted"), meta.get("clips")
    if passed:
        outcome = f"{accepted} of {clips} trajectories go into the refresh"
    elif rate < gate.min_pass_rate:
        outcome = "refresh blocked: the filters keep almost nothing (the generator or the filters are off)"
    else:
        outcome = "refresh blocked: the filters keep nearly everything (they are not filtering)"
    held_out = meta.get("held_out_false_rejection")
    if isinstance(held_out, (int, float)):
        # What a rejection is worth: the share of real clips the filters reject when calibrated without them.
        outcome += f"; the filters reject {held_out:.1%} of real clips of episodes they were calibrated without"
    return Decision(name="curation", subject=subject, passed=passed, outcome=outcome, criteria=criteria)


# -------------------------------------------------------------------------------------------------- build on


def build_on_decision(refreshed: dict[str, Any], loads: bool, gate: RefreshGate, subject: str) -> Decision:
    """Whether the next iteration ingests this refreshed version: it loads with LeRobot, and its synthetic
    episodes' usefulness verdict is one the gate builds on (a version without synthetic episodes equals the
    real data and may be built on)."""
    criteria = [Criterion(name="loads with LeRobot", value=str(loads), threshold="True", rule="True", passed=loads)]
    synthetic = int(refreshed.get("synthetic_episodes", 0) or 0)
    if synthetic:
        verdict = str(refreshed.get("usefulness_verdict") or "inconclusive")
        criteria.append(Criterion(name="usefulness verdict", value=verdict, threshold=", ".join(gate.build_on),
                                  rule=f"one of {', '.join(gate.build_on)}", passed=verdict in gate.build_on))
    passed = all(c.passed for c in criteria)
    outcome = ("the next iteration ingests it" if passed else
               "the next iteration keeps the current demonstrations" +
               (f" (see {refreshed['usefulness_report']})" if refreshed.get("usefulness_report") else ""))
    return Decision(name="build on", subject=subject, passed=passed, outcome=outcome, criteria=criteria)


def policy_verdict_decision(policy: dict[str, Any], gate: RefreshGate, subject: str) -> Decision:
    """The closed-loop comparison's verdict (policy_evaluation's metadata) against gates.refresh.build_on; not
    evaluated (and why) fails the decision, so the run shows that no policy was measured."""
    if not policy.get("evaluated"):
        return Decision(name="policy verdict", subject=subject, passed=False,
                        outcome=f"not evaluated: {policy.get('not_evaluated', 'no reason recorded')}",
                        criteria=[Criterion(name="policy evaluated", value="no", threshold="yes", rule="yes",
                                            passed=False)])
    verdict = str(policy.get("policy_verdict"))
    metric = policy.get("policy_primary_metric")
    criteria = [Criterion(name=f"policy verdict on {metric}", value=verdict, threshold=", ".join(gate.build_on),
                          rule=f"one of {', '.join(gate.build_on)}", passed=verdict in gate.build_on)]
    for arm in ("real", "refreshed"):
        value = policy.get(f"policy_{metric}_{arm}_mean")
        if isinstance(value, (int, float)):
            criteria.append(Criterion(name=f"{metric} {arm}", value=float(value), threshold=None, rule="recorded",
                                      passed=True))
    passed = all(c.passed for c in criteria)
    return Decision(name="policy verdict", subject=subject, passed=passed, criteria=criteria,
                    outcome=f"{verdict}: {policy.get('policy_verdict_reason', '')}")


def policy_build_on_decision(refreshed: dict[str, Any], policy: dict[str, Any], gate: RefreshGate,
                             subject: str) -> Decision:
    """build on with `evidence: policy`: the policy verdict stands in for the IDM verdict where a policy was
    evaluated; elsewhere the IDM verdict decides, and the decision says so."""
    loads = bool(refreshed.get("loads_with_lerobot", False))
    if policy.get("evaluated"):
        decision = build_on_decision({**refreshed, "usefulness_verdict": policy.get("policy_verdict"),
                                      "usefulness_report": policy.get("path")}, loads, gate, subject)
        evidence = "closed-loop policy"
    else:
        decision = build_on_decision(refreshed, loads, gate, subject)
        evidence = f"IDM proxy (no policy evaluated: {policy.get('not_evaluated', 'no reason recorded')})"
    decision.criteria.append(Criterion(name="evidence", value=evidence, threshold="policy", passed=True,
                                       rule="the policy verdict where evaluated, else the IDM proxy"))
    decision.outcome += f" [evidence: {evidence}]"
    return decision


# ------------------------------------------------------------------------------------ adapter line (stateful)


def register_candidate(lineage, run, adapter_result, training_digest: str, parent_version: str | None) -> str:
    """Register a trained (or imported) adapter as the newest `candidate` of the domain's line; returns its
    version. Idempotent on the adapter's content: the same files are the same version. The parent is set only
    when training continued that adapter (flywheel.train.init_adapter). Its files are verified against the
    digests recorded when it was written first: a changed file registers nothing (IntegrityError)."""
    from flywheel.store import verify_dir

    verify_dir(adapter_result.path)
    return lineage.register_adapter(run, adapter_result, training_digest, parent_version)


def gate_and_promote(lineage, version: str, metrics: dict[str, Any], gate: AdapterGate, actor: str) -> Decision:
    """The adapter gate on an evaluation: record both sides on the version, decide against the base model and
    the current champion, promote when it passes, and record the decision either way (a governance run)."""
    from flywheel.lineage import registry

    candidate, base = evaluation_sides(metrics)
    registry.record_evaluation(lineage.home, lineage.domain, version, candidate, base)
    decision = _gate_version(lineage.home, lineage.domain, version, candidate, base, gate, actor)
    registry.apply_promotion(lineage.home, lineage.domain, version, decision)
    return decision


def _gate_version(home, domain: str, version: str, candidate: dict, base: dict, gate: AdapterGate,
                  actor: str) -> Decision:
    from flywheel.lineage import registry

    champion = registry.champion_version(home, domain)
    champion_metrics = None
    if champion is not None and champion != str(version):
        champion_metrics = registry.evaluation_of(home, domain, champion)[0] or None
    subject = f"{registry.registered_model_name(domain)} v{version}"
    decision = adapter_decision(candidate, base, champion_metrics, gate, subject,
                                champion_label=f"v{champion}" if champion and champion != str(version) else "")
    decision.actor = actor
    return decision


def promote_by_hand(home, domain: str, version: str, gate: AdapterGate, actor: str) -> Decision:
    """`flywheel adapters promote`: the same gate on the version's recorded evaluation. A version without one
    is refused (and the refusal recorded); so is one that fails the gate."""
    from flywheel.lineage import registry

    candidate, base = registry.evaluation_of(home, domain, version)
    subject = f"{registry.registered_model_name(domain)} v{version}"
    if not candidate:
        decision = Decision(name="adapter gate", subject=subject, passed=False, actor=actor,
                            outcome="refused: the version has no recorded evaluation; materialize adapter_evaluation "
                                    "for it (or run `flywheel evaluate`) first",
                            criteria=[Criterion(name="recorded evaluation", value="none", threshold="present",
                                                rule="present", passed=False)])
    else:
        decision = _gate_version(home, domain, version, candidate, base, gate, actor)
    registry.apply_promotion(home, domain, version, decision)
    decision.refuse()
    return decision


def rollback(home, domain: str, to_version: str | None, actor: str, reason: str = "") -> Decision:
    """Champion back to an earlier champion (default: the previous one); refused (and recorded) when there is none."""
    from flywheel.lineage import registry

    stack = registry.champion_stack(home, domain)
    current = registry.champion_version(home, domain)
    target = to_version if to_version is not None else (stack[-2] if len(stack) >= 2 else None)
    earlier = stack[:-1]
    ok = target is not None and str(target) in earlier
    subject = f"{registry.registered_model_name(domain)} champion"
    rule = f"one of the earlier champions [{', '.join(earlier) or 'none'}]"
    decision = Decision(
        name="rollback", subject=subject, passed=ok, actor=actor,
        outcome=(f"champion v{current} -> v{target}" if ok else
                 f"refused: champion stays {('v' + current) if current else 'none'}; roll back only to a former "
                 "champion, or promote a version through the gate"),
        criteria=[Criterion(name="target", value=str(target) if target is not None else "none", threshold=rule,
                            rule=rule, passed=ok)])
    registry.apply_rollback(home, domain, str(target) if target is not None else None, decision, reason)
    decision.refuse()
    return decision


# ------------------------------------------------------------------------------------------------ generator


class GeneratingAdapter(BaseModel):
    """The adapter that generates the synthetic videos, and why."""

    path: str | None   # adapter directory; None = the base model
    key: str           # what `inputs` records (the adapter's store key, or "base")
    version: str | None
    label: str         # e.g. "champion v3", "base (no champion yet)"


def choose_generating_adapter(lineage, choice: str, latest_adapter: dict[str, Any] | None) -> GeneratingAdapter:
    """`generate.adapter`: 'champion' (default; the base model while the domain has none), 'base', a registry
    version ('3'), 'latest' (this domain's latest trained adapter, gated or not), an adapter key under
    <home>/adapters, or an adapter directory."""
    home = lineage.home
    if choice == "champion":
        champion = lineage.champion()
        if champion is None:
            return GeneratingAdapter(path=None, key="base", version=None, label="base (no champion yet)")
        version, path = champion
        return GeneratingAdapter(path=str(path), key=Path(path).name, version=version, label=f"champion v{version}")
    if choice == "base":
        return GeneratingAdapter(path=None, key="base", version=None, label="base")
    if choice.isdigit():
        path = lineage.adapter_dir(choice)
        return GeneratingAdapter(path=str(path), key=path.name, version=choice, label=f"v{choice}")
    if choice == "latest":
        if latest_adapter is None:
            raise DecisionRefused("generate.adapter 'latest': this domain has no trained adapter yet; materialize "
                                  "`adapter` first or choose 'champion' / 'base'")
        version = latest_adapter.get("registered_version") or lineage.version_of_adapter_dir(latest_adapter["path"])
        return GeneratingAdapter(path=str(latest_adapter["path"]), key=str(latest_adapter["key"]),
                                 version=str(version) if version else None, label=f"latest ({latest_adapter['key']})")
    path = Path(choice).expanduser()
    if not path.is_dir():
        path = Path(home) / "adapters" / choice
    if not (path / "adapter_card.json").is_file():
        raise DecisionRefused(f"generate.adapter {choice!r}: no adapter_card.json at {path}; give 'champion', 'base', a "
                              f"registry version (e.g. '3'), 'latest', or an adapter key (a folder name under "
                              f"{Path(home) / 'adapters'}); an adapter trained elsewhere: `flywheel adapters import` it")
    if path.resolve().parent != (Path(home) / "adapters").resolve():
        raise DecisionRefused(f"generate.adapter {choice!r}: {path} is not in this home's adapter store, so its files "
                              "cannot be verified; `flywheel adapters import` it first and use the version it gets")
    version = lineage.version_of_adapter_dir(path)
    return GeneratingAdapter(path=str(path.resolve()), key=path.name, version=version, label=path.name)


def continued_adapter(lineage, init_adapter: str | None) -> tuple[str | None, str | None]:
    """(adapter dir, registry version) training continues from, for `train.init_adapter`: None (from the base
    model), 'champion' (the domain's champion; the base model while there is none), or an adapter directory."""
    if not init_adapter:
        return None, None
    if str(init_adapter) == "champion":
        champion = lineage.champion()
        return (str(champion[1]), champion[0]) if champion else (None, None)
    return str(init_adapter), lineage.version_of_adapter_dir(init_adapter)


def summarize(decisions: Sequence[Decision]) -> str:
    return "\n".join(d.line() for d in decisions)


# ----------------------------------------------------------------------------------- the stages' decisions


@dataclass
class Step:
    """One stage of one run, as the decisions see it: where, for which domain, with which config and inputs,
    the iteration's lineage and this stage's MLflow run, who runs it, and how to read another asset's latest
    result. The Dagster asset builds it; the hooks below read and adjust it."""

    home: Path
    domain: str
    config: Any                        # flywheel.config.FlywheelConfig (not imported: config imports Gates)
    inputs: dict[str, Any]             # upstream asset -> flywheel.stages.StageResult
    lineage: Any                       # flywheel.lineage.recorder.IterationLineage
    actor: str
    inbox: Path | None = None
    latest: Callable[[str], Any] | None = None  # asset -> its latest StageResult for this domain, or None
    run: Any = None                    # this stage's flywheel.lineage.runs.StepRun, once opened
    facts: dict[str, Any] = field(default_factory=dict)  # what a prepare hook decided, for the decide hook

    @property
    def subject(self) -> str:
        return f"domain {self.domain}"


def record_on_step(step: Step, decision: Decision) -> None:
    """A stage decision on the stage's MLflow run: a tag with its line, metrics for its numeric criteria."""
    if step.run is None:
        return
    key = decision.name.replace(" ", "_")
    step.run.set_tags({f"flywheel.decision.{key}": "passed" if decision.passed else "failed",
                       f"flywheel.decision.{key}.line": decision.line()[:4900],
                       f"flywheel.decision.{key}.actor": decision.actor})
    step.run.log_metrics({f"decision.{key}.{c.key}": float(c.value) for c in decision.criteria
                          if isinstance(c.value, (int, float)) and not isinstance(c.value, bool)})


def _stage_decision(step: Step, decision: Decision) -> Decision:
    decision.actor = step.actor
    record_on_step(step, decision)
    return decision


def prepare_demonstrations(step: Step) -> None:
    """The domain's source: ingest.source, else its newest accepted refreshed version, its registration, ..."""
    from flywheel.config import resolve_sample_source
    from flywheel.domains import registration, resolve_source

    ingest = step.config.ingest
    registered = registration(step.home, step.domain)
    updates = {name: registered[name] for name in ("format", "camera_key", "repo_id", "val_fraction", "test_fraction")
               if name in registered and getattr(ingest, name) == type(ingest).model_fields[name].default}
    source = resolve_source(step.home, step.inbox or step.home / "inbox", step.domain, ingest.source,
                            ingest.follow_refreshed)
    step.config.ingest = ingest.model_copy(update={**updates, "source": resolve_sample_source(source)})


def decide_demonstrations(step: Step, result) -> list[Decision]:
    return [_stage_decision(step, demonstrations_decision(result.metadata, step.config.gates.demonstrations,
                                                          f"{step.subject} demonstrations"))]


def decide_training_clips(step: Step, result) -> list[Decision]:
    """The model-fit check, on the VAE round-trip the clips stage measured (skipped when disabled)."""
    gate = step.config.gates.fit
    if not gate.enabled:
        return []
    meta = result.metadata
    if not isinstance(meta.get("fit_psnr_db"), (int, float)):
        decision = Decision(name="model fit", subject=f"{step.subject} clips", passed=False,
                            outcome="the clips stage measured no VAE round-trip; materialize training_clips again",
                            criteria=[Criterion(name="VAE round-trip measured", value="no", threshold="yes",
                                                rule="yes", passed=False)])
    else:
        decision = fit_decision({"psnr_db": meta["fit_psnr_db"], "ssim": meta["fit_ssim"]}, gate,
                                step.config.model.preset, f"{step.subject} clips")
    return [_stage_decision(step, decision)]


def prepare_adapter(step: Step) -> None:
    """`train.init_adapter: champion` continues the domain's champion (the base model while there is none)."""
    path, version = continued_adapter(step.lineage, step.config.train.init_adapter)
    step.config.train = step.config.train.model_copy(update={"init_adapter": Path(path) if path else None})
    step.facts["parent_version"] = version


def decide_adapter(step: Step, result) -> list[Decision]:
    """Training ended with a finite loss; the adapter becomes the domain's newest candidate version."""
    loss = result.metadata.get("final_loss")
    loss = float(loss) if isinstance(loss, (int, float)) else float("nan")
    decision = Decision(name="training", subject=f"{step.subject} adapter", passed=math.isfinite(loss),
                        outcome="a candidate adapter" if math.isfinite(loss) else "the loss diverged: not registered",
                        criteria=[Criterion(name="final loss", value=loss, threshold="finite", rule="finite",
                                            passed=math.isfinite(loss))])
    _stage_decision(step, decision)
    if decision.passed:
        clips = step.inputs["training_clips"]
        version = register_candidate(step.lineage, step.run, result,
                                     str(clips.metadata.get("latent_cache_key") or clips.key),
                                     step.facts.get("parent_version"))
        result.metadata["registered_version"] = version
        decision.outcome = f"candidate v{version}"
    return [decision]


def prepare_adapter_evaluation(step: Step) -> None:
    """`evaluate.adapter`: the latest trained adapter (default), or a registered version / adapter key."""
    from flywheel.stages import StageResult

    choice = step.config.evaluate.adapter
    if choice == "latest":
        return
    chosen = choose_generating_adapter(step.lineage, choice, None)
    if chosen.path is None:
        raise DecisionRefused(f"evaluate.adapter {choice!r}: the base model is what adapters are compared with; "
                              "name an adapter ('latest', a registry version, or an adapter key)")
    step.inputs["adapter"] = StageResult(stage="adapter", key=chosen.key, path=Path(chosen.path),
                                         metadata={"registered_version": chosen.version})


def decide_adapter_evaluation(step: Step, result) -> list[Decision]:
    adapter = step.inputs["adapter"]
    version = adapter.metadata.get("registered_version") or step.lineage.version_of_adapter_dir(adapter.path)
    if version is None:  # evaluated an adapter that was never registered (e.g. trained elsewhere): register it now
        clips = step.inputs["training_clips"]
        version = register_candidate(step.lineage, step.run, adapter,
                                     str(clips.metadata.get("latent_cache_key") or clips.key), None)
    decision = gate_and_promote(step.lineage, str(version), result.metadata, step.config.gates.adapter, step.actor)
    result.metadata["registered_version"] = str(version)
    record_on_step(step, decision)
    return [decision]


def prepare_synthetic_videos(step: Step) -> None:
    from flywheel.stages import StageResult

    latest = step.latest("adapter") if step.latest and step.config.generate.adapter == "latest" else None
    latest_meta = latest.as_metadata() if latest is not None else None
    chosen = choose_generating_adapter(step.lineage, step.config.generate.adapter, latest_meta)
    step.facts["generating_adapter"] = chosen
    if chosen.path is not None:
        step.inputs["generating_adapter"] = StageResult(stage="adapter", key=chosen.key, path=Path(chosen.path),
                                                        metadata={"registered_version": chosen.version})


def decide_synthetic_videos(step: Step, result) -> list[Decision]:
    chosen: GeneratingAdapter = step.facts["generating_adapter"]
    step.lineage.record_synthetic(step.run, result, chosen.version, step.config.model.preset)
    result.metadata["generated_with"] = chosen.label
    if chosen.version:
        result.metadata["registered_version"] = chosen.version  # the asset links to that model version
    return []


def decide_curated_trajectories(step: Step, result) -> list[Decision]:
    return [_stage_decision(step, curation_decision(result.metadata, step.config.gates.curation,
                                                    f"{step.subject} curation"))]


def loads_with_lerobot(root: Path) -> dict[str, Any]:
    """Open a dataset version the way a policy trainer would, and read its first and last frame."""
    import json

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    info = json.loads((root / "meta" / "info.json").read_text())
    dataset = LeRobotDataset(repo_id=info.get("repo_id") or f"flywheel/{root.name}", root=root, video_backend="pyav")
    first, last = dataset[0], dataset[len(dataset) - 1]
    return {"episodes": int(dataset.num_episodes), "frames": int(dataset.num_frames),
            "features": sorted(first.keys()), "last_episode_index": int(last["episode_index"])}


def decide_refreshed_dataset(step: Step, result) -> list[Decision]:
    """The version loads with LeRobot (its counts matching), and whether the next iteration builds on it."""
    import json

    from flywheel.domains import record_refreshed_version

    curated = step.inputs["curated_trajectories"].path / "curated.json"
    step.lineage.record_refreshed(step.run, result, Path(json.loads(curated.read_text())["synthetic"]).name)
    meta, subject = result.metadata, f"{step.subject} dataset version {str(result.key)[:12]}"
    expected = int(meta.get("real_episodes", 0)) + int(meta.get("synthetic_episodes", 0))
    try:
        loaded = loads_with_lerobot(Path(meta.get("dataset_root") or result.path))
        problem = None if loaded["episodes"] == expected else (
            f"{loaded['episodes']} episodes where the refresh wrote {expected}")
    except Exception as e:  # whatever stops LeRobotDataset from loading it is what this check is for
        loaded, problem = {}, f"LeRobotDataset cannot load it: {type(e).__name__}: {e}"
    loads = Decision(name="loads with lerobot", subject=subject, passed=problem is None,
                     outcome=problem or f"{loaded['episodes']} episodes, {loaded['frames']} frames",
                     criteria=[Criterion(name="episodes loaded", value=loaded.get("episodes"), threshold=expected,
                                         rule=f"== {expected}", passed=problem is None)])
    _stage_decision(step, loads)
    result.metadata["loads_with_lerobot"] = loads.passed
    if step.config.gates.refresh.evidence == "policy":  # decide_policy_evaluation makes the build-on decision
        result.metadata["build_on_decided_by"] = "policy_evaluation"
        return [loads]
    build = _stage_decision(step, build_on_decision(meta, loads.passed, step.config.gates.refresh, subject))
    result.metadata["next_iteration_ingests_it"] = build.passed
    if build.passed:
        record_refreshed_version(step.home, step.domain, result.path)
    return [loads, build]


def decide_policy_evaluation(step: Step, result) -> list[Decision]:
    """The policy verdict (recorded on the stage's MLflow run with its report); with gates.refresh.evidence:
    policy, also whether the next iteration builds on the refreshed version."""
    import json

    from flywheel.domains import record_refreshed_version

    refreshed = step.inputs["refreshed_dataset"]
    subject = f"{step.subject} dataset version {str(refreshed.key)[:12]}"
    gate = step.config.gates.refresh
    verdict = _stage_decision(step, policy_verdict_decision(result.metadata, gate, subject))
    report = Path(result.path) / "report.json"
    if step.run is not None and report.is_file():
        step.run.log_json_artifact("policy_evaluation/report.json", json.loads(report.read_text()))
    if gate.evidence != "policy":
        return [verdict]
    policy = {**result.metadata, "path": str(result.path)}
    build = _stage_decision(step, policy_build_on_decision(refreshed.metadata, policy, gate, subject))
    result.metadata["next_iteration_ingests_it"] = build.passed
    if build.passed:
        record_refreshed_version(step.home, step.domain, refreshed.path)
    return [verdict, build]


# ------------------------------------------------------------------------------------------- adapter import


def import_adapter_version(home, domain: str, adapter_dir, actor: str, reason: str = "") -> tuple[str, Decision]:
    """Register an adapter written by flywheel.train.adapter_import.import_adapter as the domain's newest
    `candidate` (lineage "external"), recorded as an `import` governance run. Refused -- recorded as
    `import-refused`, nothing registered -- when its card is not an import's (lineage external, source digest)
    or its declared base model is not the one the domain's adapter line is built on. The candidate then goes
    through the same adapter gate as a trained one (materialize adapter_evaluation for it). Returns
    (version, decision); registering the same files again returns the same version."""
    from flywheel.lineage import registry

    adapter_dir = Path(adapter_dir)
    card = registry.read_adapter_card(adapter_dir)
    source = card.get("source") if isinstance(card.get("source"), dict) else {}
    declared = f"{card.get('base_model_id')}@{card.get('base_revision')}"
    line = registry.line_base_model(home, domain)
    criteria = [
        Criterion(name="card lineage", value=str(card.get("lineage")), threshold="external", rule="external",
                  passed=card.get("lineage") == "external"),
        Criterion(name="source digest", value=str(source.get("sha256") or "none")[:16], threshold="recorded",
                  rule="the imported file's sha256, recorded", passed=bool(source.get("sha256"))),
        Criterion(name="base model", value=declared, threshold=line or "any",
                  rule=f"the line's base model {line}" if line else "any (the line has no version yet)",
                  passed=line is None or declared == line),
    ]
    passed = all(c.passed for c in criteria)
    subject = f"{registry.registered_model_name(domain)} import of {source.get('file') or adapter_dir.name}"
    decision = Decision(name="import", subject=subject, passed=passed, actor=actor, criteria=criteria,
                        outcome=("the newest candidate (lineage external); its evaluation gates it like a trained "
                                 "one" if passed else "refused: nothing registered; import it with "
                                 "flywheel.train.adapter_import against the domain's base model"))
    version = registry.apply_import(home, domain, adapter_dir, decision, reason)
    decision.refuse()
    return str(version), decision


def import_adapter_file(config, source: Path, domain: str, alpha: float | None, rank: int | None,
                        actor: str) -> tuple[str, Path]:
    """`flywheel adapters import`: check an adapter trained elsewhere against the base model (every targeted
    module present, shapes matching, alpha known: flywheel.train.adapter_import), write it into the home's
    adapter store (content-addressed, its files' digests recorded), and register it (`import_adapter_version`).
    It becomes champion only through the adapter gate, like any other. Returns (version, adapter dir)."""
    from flywheel.domains import check_domain_name
    from flywheel.model.presets import load_pipeline
    from flywheel.store import ArtifactStore, hash_file, hash_json, resolve_home, verify_dir
    from flywheel.train.adapter_import import declared_base_model, import_adapter

    check_domain_name(domain)
    home = resolve_home(config.home)
    source = Path(source).expanduser()
    if not source.exists():
        raise DecisionRefused(f"{source}: not found; give a pytorch_lora_weights.safetensors file, a folder holding "
                              "it, or a peft adapter folder")
    weights = source if source.is_file() else next(iter(sorted(source.glob("*.safetensors"))), None)
    digest = hash_file(weights) if weights is not None else hash_json(str(source.resolve()))
    pipe = load_pipeline(config.model.preset, seed=config.model.seed, device="cpu", safety=config.model.safety,
                         transformer_only=True)
    store = ArtifactStore(home)
    key = "import-" + hash_json({"source": digest, "alpha": alpha, "rank": rank,
                                 "model": config.model.model_dump(mode="json", exclude={"device"})})[:24]
    with store.lock("adapters", key):
        if not store.exists("adapters", key):
            with store.write("adapters", key, {"lineage": "external", "source_sha256": digest}) as tmp:
                import_adapter(source, pipe.transformer, tmp, base_model=declared_base_model(pipe), alpha=alpha,
                               rank=rank)
    path = store.path("adapters", key)
    verify_dir(path)
    version, _ = import_adapter_version(home, domain, path, actor, reason=f"imported from {source}")
    return version, path
