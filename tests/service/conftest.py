"""Service test fixtures: settings for the tiny registry, clients that run the lifespan."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


def make_settings(model_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"MODEL_DIR": model_dir, "RELOAD_INTERVAL_S": 0, "TORCH_THREADS": 1}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def client(tiny_model_dir: Path) -> Iterator[TestClient]:
    """A client of the service on the tiny registry, shared by the tests that only read."""
    with TestClient(create_app(make_settings(tiny_model_dir))) as test_client:
        yield test_client


ServeFn = Callable[..., AbstractContextManager[TestClient]]


@pytest.fixture
def serve() -> ServeFn:
    """serve(model_dir, app_hook=None, **settings): a context manager yielding a client of a
    fresh app; app_hook(app) runs before the app starts."""

    @contextmanager
    def _serve(
        model_dir: Path, app_hook: Callable[[FastAPI], None] | None = None, **overrides: Any
    ) -> Iterator[TestClient]:
        app = create_app(make_settings(model_dir, **overrides))
        if app_hook:
            app_hook(app)
        with TestClient(app) as test_client:
            yield test_client

    return _serve
