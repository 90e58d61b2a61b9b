"""How pools and training workers are sized: on one node they share all but one CPU; on several nodes each
takes a whole CPU so that some node keeps a whole CPU free for Ray Data's tasks."""

from __future__ import annotations

import math

import pytest

from c3ae_ray.runtime import cpus_per_worker, pool_shape


def free_cpu_somewhere(node_cpus: list[int], actors: int, share: float) -> bool:
    """Place actors greedily, node by node, as a packing scheduler would; is a whole CPU left on some node?"""
    free = [float(c) for c in node_cpus]
    for _ in range(actors):
        node = next((i for i, f in enumerate(free) if f + 1e-9 >= share), None)
        if node is None:
            return False
        free[node] -= share
    return max(free) >= 1 - 1e-9


@pytest.mark.parametrize(
    "nodes, expected",
    [
        ([2], ("cpu", 2, 0.5)),  # a 2-core laptop: both actors, one CPU's worth left
        ([4], ("cpu", 4, 0.75)),
        ([2, 2], ("cpu", 3, 1.0)),  # 0.75 each would leave 0.5 per node: no read task could run
        ([8, 8, 8], ("cpu", 23, 1.0)),
    ],
)
def test_detector_pools_leave_a_whole_cpu_free_on_some_node(nodes, expected):
    cluster = {"CPU": float(sum(nodes)), "nodes": len(nodes)}
    device, actors, cpus, gpus = pool_shape(cluster, "auto", None)
    assert (device, actors, cpus) == expected and gpus == 0
    assert free_cpu_somewhere(nodes, actors, cpus)


def test_fractional_shares_on_two_nodes_would_starve_the_pipeline():
    assert not free_cpu_somewhere([2, 2], 4, 0.75)


@pytest.mark.parametrize("nodes, workers", [([2, 2], 2), ([2, 2], 3), ([4, 4], 7), ([2], 2), ([2], 1)])
def test_training_workers_fit_and_leave_a_cpu(nodes, workers):
    share = cpus_per_worker({"CPU": float(sum(nodes)), "nodes": len(nodes)}, workers)
    assert 0 < share <= 1 and free_cpu_somewhere(nodes, workers, share)


def test_gpu_pools_take_a_gpu_each_or_share_them():
    assert pool_shape({"CPU": 16.0, "GPU": 2.0, "nodes": 2}, "auto", None) == ("cuda", 2, 1.0, 1.0)
    assert pool_shape({"CPU": 8.0, "GPU": 1.0}, "cuda", 4)[3] == 0.25
    with pytest.raises(ValueError, match="no CUDA GPU"):
        pool_shape({"CPU": 8.0}, "cuda", None)
    assert math.isclose(pool_shape({"CPU": 8.0}, "cpu", 14)[2], 7 / 14)
