"""Shared fixtures. Test layers live in folders and get their marker from it:
unit (no Ray), integration (one local Ray per session), e2e (the `c3ae` command as typed)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def pytest_collection_modifyitems(config, items):
    for item in items:
        layer = Path(str(item.fspath)).parent.name
        if layer in ("unit", "integration", "e2e"):
            item.add_marker(layer)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data; tests that need it skip only when ../shared is absent (CI has it)."""
    if not SHARED.is_dir():
        pytest.skip("../shared is absent")
    return SHARED / "data"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: fixed CPUs, capped object store, no dashboard.

    Ray Data hangs on 2 cores when an actor pool takes every CPU, so stages under test must leave
    headroom; 4 logical CPUs let a 2-actor pool and its tasks coexist on this machine's 2 cores.
    """
    import ray

    ray.init(
        num_cpus=4,
        object_store_memory=256 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
