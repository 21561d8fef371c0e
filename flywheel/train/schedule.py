"""The learning-rate schedule of the Cosmos Predict 2.5 LoRA recipe: linear warm-up, then linear decay.

The multiplier on the base learning rate goes f_start -> f_max over `warmup_steps`, then f_max -> f_min
at the end of the cycle, and stays at f_min after it (the recipe's scheduler has no defined value
past its last cycle; a flat tail is the safe reading).
"""

from __future__ import annotations

import dataclasses

import torch

from flywheel.train.config import TrainConfig


@dataclasses.dataclass
class LinearWarmupLinearDecay:
    """LR multiplier as a function of the step. A dataclass, not a lambda: LambdaLR checkpoints its fields."""

    warmup_steps: int
    cycle_length: int
    f_start: float
    f_max: float
    f_min: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.f_start + (self.f_max - self.f_start) * step / self.warmup_steps
        if step >= self.cycle_length:
            return self.f_min
        remaining = (self.cycle_length - step) / (self.cycle_length - self.warmup_steps)
        return self.f_min + (self.f_max - self.f_min) * remaining


def lr_multiplier(config: TrainConfig) -> LinearWarmupLinearDecay:
    return LinearWarmupLinearDecay(
        warmup_steps=config.resolved_warmup_steps,
        cycle_length=config.resolved_cycle_length,
        f_start=config.f_start,
        f_max=config.f_max,
        f_min=config.f_min,
    )


def build_optimizer_and_scheduler(
    params: list[torch.nn.Parameter], config: TrainConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lr_multiplier(config))
    return optimizer, scheduler
