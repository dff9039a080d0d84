"""The tests' and the benchmark's local Ray cluster: :class:`densecap.ray_cluster.RayCluster`."""

from ..ray_cluster import RayCluster, ray_env, session_pids

__all__ = ["RayCluster", "ray_env", "session_pids"]
