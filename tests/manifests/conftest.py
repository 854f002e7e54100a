"""Fixtures for the manifest tests: the rendered base and overlays, and the LWS CRD schema."""

from __future__ import annotations

import copy
import functools

import pytest

from tests.manifests.strict_crd import CrdSchema
from tests.manifests.targets import LWS_CRD, TARGETS, Obj, rendered


@functools.cache
def _lws_schema() -> CrdSchema:
    return CrdSchema.load(LWS_CRD)


@pytest.fixture
def lws_schema() -> CrdSchema:
    if not LWS_CRD.is_file():
        pytest.skip(f"the LeaderWorkerSet CRD is not at {LWS_CRD} (shared data kept beside the repository)")
    return _lws_schema()


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def objects(target: str) -> list[Obj]:
    """A deep copy of the target's rendered objects (a test may change them)."""
    return copy.deepcopy(list(rendered(target)))
