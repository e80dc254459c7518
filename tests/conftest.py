"""Test configuration: 4 host devices for the sharding tests (set before jax is imported), float64
enabled for the reference comparisons, and a `device` fixture over the available platforms."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


def _has_gpu():
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


HAS_GPU = _has_gpu()
PLATFORMS = [pytest.param("cpu"),
             pytest.param("gpu", marks=pytest.mark.skipif(not HAS_GPU, reason="no GPU"))]


@pytest.fixture(params=PLATFORMS)
def device(request):
    """A device of each platform; tests put their inputs there and computations follow."""
    return jax.devices(request.param)[0]


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=60,
                     help="hypothesis examples per property test (default 60)")


def pytest_configure(config):
    from hypothesis import HealthCheck, settings
    settings.register_profile(
        "jax_transducer", max_examples=config.getoption("--fuzz-examples"), deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        derandomize=True)
    settings.load_profile("jax_transducer")
