"""Where stages run: the cluster at RAY_ADDRESS when it is set, else an embedded local Ray sized for this machine."""

from __future__ import annotations

import contextlib
import os

from c3ae_ray.config import check


@contextlib.contextmanager
def ray_runtime():
    """Connect (or start) Ray for one stage; leave a Ray that was already running untouched.

    Local Ray gets a fixed CPU count and a capped object store so it behaves the same on a laptop and in
    CI (Ray Data otherwise sizes itself from the whole machine); RAY_ADDRESS connects to a cluster instead.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    # Ray Data's INFO lines (execution plans, "execution finished") in every process this Ray starts, training's
    # data actors among them: each stage prints its own progress; RAY_DATA_LOG_LEVEL=INFO brings them back.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        ray.init(
            num_cpus=os.cpu_count(),
            object_store_memory=int(min(2 * 2**30, memory * 0.2)),
            include_dashboard=True,  # also serves the state API that Train V2's placement-group cleaner polls
            configure_logging=False,
        )
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_shape() -> dict:
    """The connected cluster's CPU and GPU totals and how many alive nodes have CPUs (the pools' sizing input)."""
    import ray

    nodes = [node for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0]
    return {**ray.cluster_resources(), "nodes": max(1, len(nodes))}


def cpus_per_worker(cluster: dict, workers: int) -> float:
    """CPUs each of `workers` actors may claim so that at least one whole CPU stays free on some node: Ray
    Data's read, decode and write tasks need it, and a pool that takes every CPU hangs the pipeline.

    One node: the actors share all but one CPU (or half of a small machine). Several nodes: each actor takes
    a whole CPU while the cluster has a CPU to spare, since fractional shares would leave less than one CPU
    free on every node (0.75 + 0.75 of 2 on each of two nodes) and the pipeline's tasks could run nowhere.
    """
    cpus = cluster.get("CPU", 1.0)
    if cluster.get("nodes", 1) > 1 and workers <= cpus - 1:
        return 1.0
    return min(1.0, max(cpus - 1, cpus / 2) / workers)


def pool_shape(cluster: dict, device: str, actors: int | None) -> tuple[str, int, float, float]:
    """(device, actors, CPUs per actor, GPUs per actor) for a detector pool over `cluster_shape()`: 'auto' takes
    the cluster's GPUs when it has any; CPU actors never claim every CPU, since Ray Data's other tasks need one
    (on several nodes the default is one actor per CPU but one)."""
    from c3ae_ray.config import resolve_device

    cpus, gpus = cluster.get("CPU", 1.0), cluster.get("GPU", 0.0)
    device = resolve_device(device, gpus)
    if device == "cuda":
        actors = actors or int(gpus)
        return device, actors, cpus_per_worker(cluster, actors), min(1.0, gpus / actors)
    if not actors:
        actors = max(1, int(cpus) - 1) if cluster.get("nodes", 1) > 1 else max(1, int(cpus))
    return device, actors, cpus_per_worker(cluster, actors), 0.0


def check_trial_resources(cpus: float, gpus: float) -> None:
    """A Tune trial that asks for more CPUs or GPUs than the connected cluster has would wait forever: refuse it."""
    import ray

    cluster = ray.cluster_resources()
    for name, wanted in (("CPU", cpus), ("GPU", gpus)):
        check(wanted <= cluster.get(name, 0), f"--trial-{name.lower()}s {wanted:g}: the cluster has {cluster.get(name, 0):g} {name}s")
