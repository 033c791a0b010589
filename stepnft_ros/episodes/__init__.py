"""Episode schema, collation into training batches, and demonstration datasets (no ROS)."""

from stepnft_ros.episodes.schema import (
    Decision,
    DecisionBatch,
    Episode,
    HumanBatch,
    HumanChunk,
    collate_episodes,
    collate_human_chunks,
)

__all__ = ['Decision', 'DecisionBatch', 'Episode', 'HumanBatch', 'HumanChunk', 'collate_episodes',
           'collate_human_chunks']
