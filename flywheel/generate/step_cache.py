"""Step caching for the fast sampler: diffusers' First Block Cache on the Cosmos DiT (GenerateConfig.step_cache_threshold).

Between neighbouring denoising steps the DiT's output often barely changes. First Block Cache
(diffusers.hooks.first_block_cache) runs block 0 at every step and compares its residual (output -
input) with the one of the last fully computed step; when the relative mean absolute change is at
most `threshold`, blocks 1..N-1 are skipped and the residual they added at that step is added again.

Cosmos' transformer is not a diffusers `CacheMixin` and its block is not in diffusers'
`TransformerBlockRegistry`, so this module (1) registers the block's metadata through the
registry's own `register` (CosmosTransformerBlock.forward returns the hidden states alone and takes
them as its first argument), (2) applies diffusers' `apply_first_block_cache` unchanged, (3) sets
the cache context the hooks' state is keyed by (what `CacheMixin.cache_context` does) and (4)
removes the hooks by the names `CacheMixin.disable_cache` uses, leaving the blocks as they were.

Batched guidance stays correct: the sampler runs [conditional, unconditional] as ONE batch-2
forward, so there is one decision per step for both halves (the mean covers both) and the reused
residual holds both halves: cond and uncond are computed or skipped together, never mixed across
steps. With regional compile the hooks wrap each block's compiled forward and run eagerly
(flywheel.train.speed.RegionalCompile): enter the compile first, then the cache.
"""

from __future__ import annotations

import dataclasses

import torch

CONTEXT = "cond_uncond_batch"  # one state for the whole batched forward (see the module docstring)


@dataclasses.dataclass
class StepCacheStats:
    """What the cache did in one sampling loop: a step is 'computed' when all blocks ran."""

    threshold: float
    computed: list[bool] = dataclasses.field(default_factory=list)  # per transformer call
    # per call: relative change of block 0's residual since the last computed call, for computed calls
    # after the first (skipped calls changed by <= threshold; the hook does not keep their residual)
    changes: list[float | None] = dataclasses.field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.computed)

    @property
    def skipped(self) -> int:
        return self.computed.count(False)

    def as_dict(self) -> dict:
        return dict(threshold=self.threshold, steps=self.steps, computed_steps=self.steps - self.skipped,
                    skipped_steps=self.skipped, computed=list(self.computed),
                    changes=[None if c is None else round(c, 5) for c in self.changes])


def register_cosmos_block() -> None:
    """Tell diffusers' block registry how CosmosTransformerBlock passes hidden states (idempotent)."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
    from diffusers.models.transformers.transformer_cosmos import CosmosTransformerBlock

    try:
        TransformerBlockRegistry.get(CosmosTransformerBlock)
    except ValueError:
        TransformerBlockRegistry.register(CosmosTransformerBlock, TransformerBlockMetadata(
            return_hidden_states_index=0, return_encoder_hidden_states_index=None))


def _relative_change(current: torch.Tensor, previous: torch.Tensor) -> float:
    """First Block Cache's decision value: mean |current - previous| / mean |previous|."""
    return ((current - previous).abs().mean() / previous.abs().mean()).item()


class StepCache:
    """Context manager: First Block Cache on `transformer` inside (yields StepCacheStats), no hooks after."""

    def __init__(self, transformer: torch.nn.Module, threshold: float):
        if threshold < 0:
            raise ValueError(f"step cache threshold must be >= 0, got {threshold}")
        self.transformer = transformer
        self.blocks = list(transformer.transformer_blocks)
        if len(self.blocks) < 2:
            raise ValueError(f"the step cache needs >= 2 DiT blocks (block 0 decides, the others are skipped), "
                             f"the transformer has {len(self.blocks)}")
        self.stats = StepCacheStats(threshold=threshold)
        self._handles: list = []
        self._previous_residual: torch.Tensor | None = None

    def __enter__(self) -> StepCacheStats:
        from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        modules = [self.transformer, *self.blocks]
        if any(getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks for m in modules):
            raise RuntimeError("the transformer already carries diffusers hooks; remove them before the step cache")
        # What the hooks leave behind once removed: the blocks' own forward attribute (RegionalCompile's,
        # or none) and empty registries; __exit__ puts the first back and drops registries made here.
        self._forwards = [vars(block).get("forward") for block in self.blocks]
        self._had_registry = [hasattr(m, "_diffusers_hook") for m in modules]
        register_cosmos_block()
        try:
            apply_first_block_cache(self.transformer, FirstBlockCacheConfig(threshold=self.stats.threshold))
            registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
            registry.invalidate_child_registries_cache()
            _set_cache_context(self.transformer, CacheContext(CONTEXT))
            self._state_manager = self.blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook").state_manager
            self._handles = [self.transformer.register_forward_pre_hook(self._before_call),
                             self.transformer.register_forward_hook(self._after_call)]
        except BaseException:
            self._remove()
            raise
        return self.stats

    def __exit__(self, *exc) -> bool:
        self._remove()
        return False

    def _before_call(self, module, args) -> None:
        self._previous_residual = self._state_manager.get_state().head_block_residual

    def _after_call(self, module, args, output) -> None:
        state = self._state_manager.get_state()
        self.stats.computed.append(bool(state.should_compute))
        previous = self._previous_residual
        self.stats.changes.append(_relative_change(state.head_block_residual, previous)
                                  if state.should_compute and previous is not None else None)
        self._previous_residual = None

    def _remove(self) -> None:
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

        for handle in self._handles:
            handle.remove()
        self._handles = []
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        registry.remove_hook(_FBC_LEADER_BLOCK_HOOK, recurse=True)
        registry.remove_hook(_FBC_BLOCK_HOOK, recurse=True)
        registry.invalidate_child_registries_cache()
        self._state_manager = None  # the cached residuals (hundreds of MB at 2B) go with it
        for block, forward in zip(self.blocks, self._forwards, strict=True):
            if forward is None:
                vars(block).pop("forward", None)  # removal leaves the bound method as an instance attribute
            else:
                block.forward = forward
        for module, had in zip([self.transformer, *self.blocks], self._had_registry, strict=True):
            if not had and hasattr(module, "_diffusers_hook") and not module._diffusers_hook.hooks:
                del module._diffusers_hook
