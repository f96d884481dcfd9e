from .layer import MoELayer
from .router import Router
from .stats import RoutingStats, collect_routing_stats

__all__ = ["MoELayer", "Router", "RoutingStats", "collect_routing_stats"]
