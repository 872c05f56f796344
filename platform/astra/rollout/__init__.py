"""Interactive rollouts: serialisable sessions and the chunk engine."""

from astra.rollout.engine import generate_chunk, generate_chunks
from astra.rollout.session import RolloutSession

__all__ = ["RolloutSession", "generate_chunk", "generate_chunks"]
