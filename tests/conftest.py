"""Fixtures shared by every test package."""

from __future__ import annotations

import os

import pytest
import redis
import redis.exceptions
from hypothesis import HealthCheck, settings

DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/15"

# Shared machines stall: hypothesis's per-example deadline (200 ms) and its check that data is
# generated fast enough would fail a correct property under load. Properties here are about
# values, never about time.
settings.register_profile("kvgate", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("kvgate")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A reachable Redis for tests marked ``redis``: ``KVGATE_TEST_REDIS_URL`` (default database
    15 on 127.0.0.1:6379). Unreachable: skip, except under ``CI``, where a missing Redis fails."""
    url = os.environ.get("KVGATE_TEST_REDIS_URL", DEFAULT_TEST_REDIS_URL)
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except (redis.exceptions.RedisError, OSError) as exc:
        message = f"no Redis at {url} ({exc}): set KVGATE_TEST_REDIS_URL"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    finally:
        client.close()
    return url
