"""The flywheel's stages, each declared once: what it is called, what it reads, where it runs, what runs it.

    demonstrations -> training_clips -> adapter -> adapter_evaluation -> synthetic_videos
      -> pseudo_actions -> curated_trajectories -> refreshed_dataset -> policy_evaluation

The Dagster assets (flywheel/defs/assets.py), the CLI's stage commands and the GPU workloads
(flywheel/workloads/stage.py) all read `STAGES`; nothing else lists the stages. Every stage runs as
`stage.run(home, inputs, config, progress) -> StageResult`, where `inputs` holds the results of its
upstream stages (and, for synthetic_videos, the adapter the decisions chose) and `config` is the whole
run's FlywheelConfig: the same call in the Dagster step process, in a Pipes workload on a GPU and in a test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flywheel import decisions, stages
from flywheel.config import FlywheelConfig
from flywheel.stages import StageResult

Progress = Callable[[dict], None] | None
Inputs = dict[str, StageResult]
# The input name under which synthetic_videos receives the adapter chosen to generate (absent: the base model).
GENERATING_ADAPTER = "generating_adapter"


@dataclass(frozen=True)
class Check:
    """A decision shown as a Dagster asset check: blocking ones stop the run when they fail."""

    name: str        # the check's name; flywheel.decisions names the decision the same with spaces
    decision: str    # the Decision.name it renders
    description: str
    blocking: bool = True


@dataclass(frozen=True)
class Stage:
    asset: str                  # Dagster asset key, MLflow stage name, artifact `stage`
    command: str                # `flywheel <command>` runs the graph up to this stage
    section: str                # the config section this stage is about (its MLflow params)
    run: Callable[[Path, Inputs, FlywheelConfig, Progress], StageResult]
    upstream: tuple[str, ...]   # assets whose latest results it reads
    after: tuple[str, ...] = ()  # assets that must run first without being read (their decisions matter)
    gpu: bool = False           # holds a GPU: a Pipes workload in the `gpu` pool on a GPU host
    multi_gpu: bool = False     # may run under torchrun on several GPUs (FLYWHEEL_GPUS_PER_STEP)
    preview_title: str = "preview"
    help: str = ""              # one line: the CLI's help and the start of the asset's description
    description: str = ""       # the rest of the asset's description
    checks: tuple[Check, ...] = ()
    # flywheel.decisions hooks: before the stage runs (may adjust step.config / step.inputs), and after it
    # (the decisions on its result, each rendered by the check of the same name)
    prepare: Callable[[decisions.Step], None] | None = None
    decide: Callable[[decisions.Step, StageResult], list[decisions.Decision]] | None = None


def _ingest(home: Path, inputs: Inputs, config: FlywheelConfig, progress: Progress) -> StageResult:
    return stages.ingest_stage(home, config.ingest, progress)


def _clips(home: Path, inputs: Inputs, config: FlywheelConfig, progress: Progress) -> StageResult:
    return stages.clips_stage(home, inputs["demonstrations"].path, config.clips, config.model, progress)


def _train(home: Path, inputs: Inputs, config: FlywheelConfig, progress: Progress) -> StageResult:
    clips = inputs["training_clips"]
    return stages.train_stage(home, clips.metadata["latent_cache"], config.train, config.model, progress)


def _evaluate(home: Path, inputs: Inputs, config: FlywheelConfig, progress: Progress) -> StageResult:
    return stages.evaluate_stage(home, inputs["adapter"].path, inputs["training_clips"].path, config.evaluate,
                                 config.model, progress, generate_config=config.generate, filter_config=config.quality)


def _generate(home: Path, inputs: Inputs, config: FlywheelConfig, progress: Progress) -> StageResult:
    adapter = inputs.get(GENERATING_ADAPTER)
    return stages.generate_stage(home, adapter.path if adapter else None, inputs["training_clips"].path,
                                 config.generate, config.model, progress)


def _label(home: Path, inputs: Inputs, config: FlywheelConfig, progress: Progress) -> StageResult:
    return stages.label_stage(home, inputs["synthetic_videos"].path, inputs["demonstrations"].path, config.label,
                              progress, model=config.model, clip_config=config.clips)


def _curate(home: Path, inputs: Inputs, config: FlywheelConfig, progress: Progress) -> StageResult:
    return stages.curate_stage(home, inputs["pseudo_actions"].path, inputs["demonstrations"].path, config.quality,
                               progress, model=config.model)


def _refresh(home: Path, inputs: Inputs, config: FlywheelConfig, progress: Progress) -> StageResult:
    return stages.refresh_stage(home, inputs["curated_trajectories"].path, inputs["demonstrations"].path,
                                config.refresh, progress, clip_resize=config.clips.resize)


def _policy(home: Path, inputs: Inputs, config: FlywheelConfig, progress: Progress) -> StageResult:
    refreshed = inputs["refreshed_dataset"]
    return stages.policy_stage(home, refreshed.path, refreshed.metadata, config.policy, config.model.device, progress)


STAGE_LIST = (
    Stage("demonstrations", "ingest", "ingest", _ingest, (),
          prepare=decisions.prepare_demonstrations, decide=decisions.decide_demonstrations,
          checks=(Check("enough_episodes", "demonstrations", "enough episodes, train and held-out (gates.demonstrations)"),),
          help="ingest demonstrations into an episode manifest",
          description="The domain's demonstrations, checked episode by episode, as an episode manifest "
                      "(&lt;home&gt;/manifests/&lt;key&gt;). Source: `ingest.source`, else the domain's newest "
                      "accepted refreshed version, its registered source, or &lt;inbox&gt;/&lt;domain&gt;."),
    Stage("training_clips", "clips", "clips", _clips, ("demonstrations",), gpu=True,
          decide=decisions.decide_training_clips,
          checks=(Check("model_fits_the_data", "model fit", "the base model's VAE represents the real clips "
                                                             "(round-trip PSNR/SSIM floors, gates.fit)"),),
          help="cut training clips and cache their latents and text embeddings",
          description="Fixed-size clips cut from the demonstrations with their cached VAE latents and text "
                      "embeddings (&lt;home&gt;/clips/&lt;key&gt;), and how well the base model's VAE represents "
                      "them (the model-fit check)."),
    Stage("adapter", "train", "train", _train, ("training_clips",), gpu=True, multi_gpu=True, preview_title="loss",
          prepare=decisions.prepare_adapter, decide=decisions.decide_adapter,
          checks=(Check("loss_is_finite", "training", "training ended with a finite loss (then it is registered as the "
                                                      "domain's newest candidate)"),),
          help="train a LoRA/DoRA adapter on the cached clips",
          description="A LoRA/DoRA adapter (&lt;home&gt;/adapters/&lt;key&gt;), registered as the domain's newest "
                      "candidate in MLflow. A retried step resumes from its last checkpoint."),
    Stage("adapter_evaluation", "evaluate", "evaluate", _evaluate, ("adapter", "training_clips"), gpu=True,
          prepare=decisions.prepare_adapter_evaluation, decide=decisions.decide_adapter_evaluation,
          checks=(Check("adapter_gate", "adapter gate", "better than the base model (PSNR gain, SSIM, video-filter "
                                                        "pass rate) and not worse than the champion: promoted, else "
                                                        "refused and the champion stays (gates.adapter); generation "
                                                        "uses the champion either way", blocking=False),),
          preview_title="base vs adapter vs real",
          help="compare the adapter with the base model on held-out clips (the adapter gate)",
          description="Base vs adapter generations against the real held-out clips: PSNR, SSIM and the video "
                      "filters' pass rates (&lt;home&gt;/evaluations/&lt;key&gt;). The adapter gate decides on them: "
                      "champion or refused."),
    Stage("synthetic_videos", "generate", "generate", _generate, ("training_clips",), ("adapter_evaluation",),
          gpu=True, multi_gpu=True, preview_title="contact sheet",
          prepare=decisions.prepare_synthetic_videos, decide=decisions.decide_synthetic_videos,
          help="generate synthetic videos from clip first frames",
          description="Synthetic videos from the training clips' first frames, generated by the adapter "
                      "`generate.adapter` names (default: the domain's champion; the base model while there is "
                      "none) (&lt;home&gt;/synthetic/&lt;key&gt;)."),
    Stage("pseudo_actions", "label", "label", _label, ("synthetic_videos", "demonstrations"),
          preview_title="IDM predicted vs true",
          help="label synthetic videos with the inverse dynamics model",
          description="Per-frame actions for every synthetic video from the domain's inverse-dynamics model "
                      "(&lt;home&gt;/labels/&lt;key&gt;)."),
    Stage("curated_trajectories", "curate", "quality", _curate, ("pseudo_actions", "demonstrations"), gpu=True,
          decide=decisions.decide_curated_trajectories,
          checks=(Check("pass_rate_within_bounds", "curation", "the share of trajectories the filters keep is "
                                                               "plausible (gates.curation)"),),
          preview_title="filter scores",
          help="run the quality filter stack",
          description="The labelled synthetic trajectories that pass every quality filter, with each filter's "
                      "score and threshold (&lt;home&gt;/curated/&lt;key&gt;). Uses the base model's VAE to "
                      "calibrate, so it takes a GPU slot."),
    Stage("refreshed_dataset", "refresh", "refresh", _refresh, ("curated_trajectories", "demonstrations"),
          decide=decisions.decide_refreshed_dataset,
          checks=(Check("loads_with_lerobot", "loads with lerobot", "the version loads with LeRobotDataset and its "
                                                                    "episode count matches"),
                  Check("build_on", "build on", "the next iteration ingests it: it loads and its synthetic data's "
                                                "usefulness verdict is one gates.refresh.build_on accepts",
                        blocking=False)),
          preview_title="usefulness",
          help="write a new LeRobot dataset version with the accepted episodes",
          description="The domain's next LeRobot dataset version (v3.0): the demonstrations plus the accepted "
                      "synthetic episodes, with the usefulness verdict. The next iteration ingests it when the "
                      "build-on decision accepts it."),
    Stage("policy_evaluation", "policy", "policy", _policy, ("refreshed_dataset",), gpu=True,
          decide=decisions.decide_policy_evaluation,
          checks=(Check("policy_verdict", "policy verdict", "the same LeRobot policy trained on real + synthetic is "
                                                            "better than or non-inferior to one trained on real only, "
                                                            "closed-loop in the simulator", blocking=False),
                  Check("build_on_policy", "build on", "with gates.refresh.evidence: policy, the next iteration "
                                                       "ingests the refreshed version when the policy verdict (the "
                                                       "IDM proxy where no policy was evaluated) is one "
                                                       "gates.refresh.build_on accepts", blocking=False)),
          preview_title="rollouts (real rows, then refreshed)",
          help="train a LeRobot policy on real vs refreshed and roll both out in the simulator",
          description="Closed-loop policy evaluation (flywheel.policy, docs/policy.md): the same LeRobot policy "
                      "(ACT / diffusion), same budget and seeds, trained on the iteration's input version and on the "
                      "refreshed one, rolled out on one start list in the domain's simulator through its camera: "
                      "success and coverage with 95% intervals, the paired difference and a verdict "
                      "(&lt;home&gt;/policy_evaluations/&lt;key&gt;). `policy.evaluate: auto` runs it only where a "
                      "GPU is present and otherwise records 'not evaluated' (opt in with policy.evaluate: on)."),
)
STAGES: dict[str, Stage] = {s.asset: s for s in STAGE_LIST}
BY_COMMAND: dict[str, Stage] = {s.command: s for s in STAGE_LIST}


def up_to(asset: str) -> list[str]:
    """The assets a run up to `asset` materializes: it and everything upstream of it, in order."""
    wanted = {asset}
    for stage in reversed(STAGE_LIST):
        if stage.asset in wanted:
            wanted.update(stage.upstream + stage.after)
    return [s.asset for s in STAGE_LIST if s.asset in wanted]


def headline(result: StageResult) -> str:
    """The numbers a person wants after a stage, in a few words."""
    m = result.metadata
    if result.stage == "demonstrations":
        splits = m.get("splits") or {}
        return f"{m.get('episodes')} episodes ({', '.join(f'{k} {v}' for k, v in splits.items())})"
    if result.stage == "training_clips" and "clips" in m:
        fit = f", VAE round-trip {m['fit_psnr_db']:.1f} dB" if isinstance(m.get("fit_psnr_db"), (int, float)) else ""
        return f"{m['clips']} clips{fit}"
    if result.stage == "adapter" and "final_loss" in m:
        return f"final loss {m['final_loss']:.4f}"
    if result.stage == "adapter_evaluation" and "psnr_base" in m:
        kept = ""
        if "video_filter_pass_rate_base" in m:
            kept = (f", video filters keep {m['video_filter_pass_rate_base']:.0%} -> "
                    f"{m['video_filter_pass_rate_adapter']:.0%}")
        return (f"PSNR {m['psnr_base']:.2f} -> {m['psnr_adapter']:.2f} dB, SSIM {m['ssim_base']:.3f} -> "
                f"{m['ssim_adapter']:.3f}{kept}")
    if result.stage == "synthetic_videos" and "videos" in m:
        return f"{m['videos']} videos"
    if result.stage == "pseudo_actions" and "videos" in m:
        return f"{m['videos']} videos labelled"
    if result.stage == "curated_trajectories" and "pass_rate" in m:
        return f"accepted {m['accepted']}/{m['clips']}"
    if result.stage == "refreshed_dataset":
        verdict = f", usefulness {m['usefulness_verdict']}" if m.get("usefulness_verdict") else ""
        return f"version {str(m.get('version_id'))[:12]}: +{m.get('synthetic_episodes', 0)} synthetic episodes{verdict}"
    if result.stage == "policy_evaluation":
        if not m.get("evaluated"):
            return f"not evaluated: {m.get('not_evaluated')}"
        metric = m.get("policy_primary_metric")
        return (f"policy verdict {m.get('policy_verdict')} on {metric}: real {m.get(f'policy_{metric}_real_mean', 0):.3f}"
                f" vs refreshed {m.get(f'policy_{metric}_refreshed_mean', 0):.3f}")
    return ""
