import pytest
import torch

from world import World

_world = None


@pytest.fixture
def world8():
    """A persistent 8-rank gloo world (restarted if a previous test broke it)."""
    global _world
    if _world is None or not _world.alive:
        _world = World(8)
    yield _world


def pytest_sessionfinish(session, exitstatus):
    if _world is not None:
        _world.close()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
