from .parallel_state import Group, ParallelState, rank_groups

__all__ = ["Group", "ParallelState", "rank_groups"]
