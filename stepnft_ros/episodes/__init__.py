"""Episode schema, collation into training batches, and demonstration datasets (no ROS)."""

from stepnft_ros.episodes.schema import Decision, DecisionBatch, Episode, collate_episodes

__all__ = ['Decision', 'DecisionBatch', 'Episode', 'collate_episodes']
