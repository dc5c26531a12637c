"""Shared fixtures: a tiny real LlamaForCausalLM and a batch of token ids.

And how the suite runs on two processes (pytest-xdist, `-n 2 --dist loadgroup` in
pyproject.toml): every test that starts a Ray, in this process or in one it spawns, is in
one xdist group and so runs on one worker, one after another. Two Rays on one machine
would contend for ports a real cluster needs to itself (the `ray up` test's 6379, 8265 and
its job agent's 52365). The rest (the method's tests, schemas, configs, the MLflow server)
run beside them on the other worker, in the time the Ray tests spend waiting for processes
to start. A test starts a Ray when it is marked `ray` or uses a fixture that does."""

from __future__ import annotations

import sys

import pytest
import torch

import relora

VOCAB = 256
RAY_GROUP = "ray"
# The fixtures that start a Ray (tests/orchestrator/conftest.py): every other Ray fixture
# there (local_ray, make_trial, the cluster, the sweeps) builds on one of these.
RAY_FIXTURES = {"data_cache", "ray_data"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ray: starts a Ray (here or in a subprocess): runs in the xdist group 'ray'")


def starts_ray(item: pytest.Item) -> bool:
    return item.get_closest_marker("ray") is not None or bool(RAY_FIXTURES & set(getattr(item, "fixturenames", ())))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if starts_ray(item):
            item.add_marker(pytest.mark.xdist_group(RAY_GROUP))


@pytest.fixture(autouse=True)
def _no_unmarked_ray(request):
    """A test outside the Ray group that leaves a Ray running in this process fails: it would
    have run beside the Ray tests. Mark it `ray`."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and not starts_ray(request.node) and ray.is_initialized():
        ray.shutdown()
        pytest.fail(f"{request.node.nodeid} started a Ray: mark it @pytest.mark.ray (tests/conftest.py)")


@pytest.fixture
def tiny_llama():
    torch.manual_seed(0)
    return relora.build_model("llama-tiny", vocab_size=VOCAB, max_position_embeddings=64)


@pytest.fixture
def token_batch():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
