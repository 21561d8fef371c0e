"""A complete adapter card for an adapter made in a test (no training data, no steps)."""

from flywheel.train.adapter_io import AdapterCard


def make_card(method: str = "lora", rank: int = 4, alpha: float = 4) -> AdapterCard:
    return AdapterCard(method=method, rank=rank, alpha=alpha, scaling=alpha / rank, target_modules=["to_q"],
                       base_model={"model_id": "tiny"}, num_trainable_parameters=0)
