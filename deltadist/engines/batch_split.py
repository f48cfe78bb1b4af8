"""How a global batch divides over the ranks and their micro-batches (the engine setup needs it too:
DeepSpeed is told its micro-batch and accumulation steps)."""

from __future__ import annotations

from deltadist.errors import ConfigError


def split_batch(batch_size: int, micro_batch_size: int | None, accumulation: int | None,
                world_size: int) -> tuple[int, int]:
    """``(micro_batch_size, accumulation)`` for the config's ``training`` keys on ``world_size`` ranks.

    Raises:
        ConfigError: the global batch does not split into equal micro-batches on every rank, or
            the two keys that set the split contradict each other.
    """
    per_rank, uneven = divmod(batch_size, world_size)
    if uneven:
        raise ConfigError(
            f"training.batch_size ({batch_size}) must be divisible by the world size ({world_size}): "
            f"each rank takes an equal, contiguous share of every global batch. Use e.g. "
            f"training.batch_size={max(world_size, batch_size // world_size * world_size)}."
        )
    if micro_batch_size is None:
        accumulation = accumulation or 1
        micro_batch_size = per_rank // accumulation
    elif accumulation is None:
        accumulation = max(1, per_rank // micro_batch_size)
    if micro_batch_size * accumulation != per_rank:
        raise ConfigError(
            f"training.batch_size {batch_size} on {world_size} rank(s) is {per_rank} rows per rank, "
            f"which is not micro_batch_size x gradient_accumulation_steps "
            f"({micro_batch_size} x {accumulation}); set one of the two to null to derive it."
        )
    return micro_batch_size, accumulation
