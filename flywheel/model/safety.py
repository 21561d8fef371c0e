"""The safety checker the Cosmos pipeline requires.

The real one is NVIDIA's `cosmos_guardrail`. Presets with random weights (tiny, 2b-random) may run
with a pass-through checker; for the released weights an opt-out must be explicit, and every
choice is recorded so it shows in run metadata.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from flywheel.model.presets import ModelPreset

SafetyChoice = Literal["auto", "guardrail", "opt-out"]

INSTALL_HINT = (
    "install NVIDIA's guardrail with `uv pip install cosmos_guardrail` (it downloads its own models on first use), "
    "or opt out explicitly with `--safety opt-out` / `model.safety: opt-out` in the config; the opt-out is recorded "
    "in the run's metadata"
)


class PassThroughSafetyChecker:
    """Accepts every prompt and video. Only for random-weight presets or an explicit opt-out."""

    def to(self, *args, **kwargs):
        return self

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, video):
        return video


def guardrail_available() -> bool:
    from diffusers.utils import is_cosmos_guardrail_available

    return is_cosmos_guardrail_available()


def resolve_safety_checker(preset: "ModelPreset", choice: SafetyChoice) -> tuple[object | None, dict]:
    """(checker, record). checker None means: let diffusers build the real `CosmosSafetyChecker`."""
    if choice not in ("auto", "guardrail", "opt-out"):
        raise ValueError(f"model.safety must be 'auto', 'guardrail' or 'opt-out', got {choice!r}")
    if choice == "guardrail" or (choice == "auto" and guardrail_available()):
        if not guardrail_available():
            raise RuntimeError(f"model.safety is 'guardrail' but cosmos_guardrail is not installed: {INSTALL_HINT}")
        from cosmos_guardrail import CosmosSafetyChecker

        return CosmosSafetyChecker(), {"safety_checker": "cosmos_guardrail"}
    if choice == "opt-out":
        return PassThroughSafetyChecker(), {"safety_checker": "pass-through", "safety_opt_out": "explicit"}
    if preset.random_weights:
        return PassThroughSafetyChecker(), {"safety_checker": "pass-through", "safety_opt_out": "random-weight preset"}
    raise RuntimeError(f"the {preset.name} preset needs a safety checker and cosmos_guardrail is not installed: {INSTALL_HINT}")
