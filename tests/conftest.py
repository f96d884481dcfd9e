import pytest
import torch

from world import World

_world = None
_tiny_models: dict[tuple, str] = {}


@pytest.fixture
def world8():
    """A persistent 8-rank gloo world (restarted if a previous test broke it)."""
    global _world
    if _world is None or not _world.alive:
        _world = World(8)
    yield _world


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """make_tiny(**sizes) -> the folder of a small HunyuanImage-3.0 in the release format, written
    once per session for each set of sizes (tests that change a file copy it first)."""
    from epdiff.models.hunyuan_image3.make_tiny import make_tiny

    def make(**sizes) -> str:
        key = tuple(sorted(sizes.items()))
        if key not in _tiny_models:
            _tiny_models[key] = make_tiny(str(tmp_path_factory.mktemp("tiny")), **sizes)
        return _tiny_models[key]
    return make


@pytest.fixture
def graph_replays(monkeypatch):
    """A list that gets, for every CudaGraphStep call from now on, whether it replayed a graph."""
    from epdiff.kernels import graphs

    replays, real = [], graphs.CudaGraphStep.__call__

    def counting(self, *inputs):
        out = real(self, *inputs)
        replays.append(self.graph is not None)
        return out

    monkeypatch.setattr(graphs.CudaGraphStep, "__call__", counting)
    return replays


@pytest.fixture(scope="module")
def client(server):
    """An HTTP client of the module's `server` fixture (a module may define its own client)."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


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
