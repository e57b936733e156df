"""The emulated Metal backend (torch.ops.marlin_emu) for the kernel-vs-torch tests.

Thread schedules. Metal promises no order among the threads of a threadgroup between two
barriers, so a kernel that misses a barrier (or relies on simd operations acting as one) may
pass under one schedule and fail under another. The emulator runs the schedule named by
``METAL_MARLIN_EMU_ORDER`` (csrc/emu/runtime.cpp):

    forward        threads first to last between rendezvous
    reverse        last to first
    skew           each simdgroup runs alone up to its next threadgroup barrier, first to last
                   (simd operations then stop acting as threadgroup-wide barriers)
    skew-reverse   the same, last simdgroup first

Every kernel test here runs under at least two of them without doubling CI time: the
parametrized cases of each test function take the four schedules in turn (case i gets
``SCHEDULES[(i + offset) % 4]``, the offset fixed per function), and a function with a single
case is run twice, under two different schedules. A test that wants every schedule asks for the
``thread_order`` fixture instead. The schedule a case ran under is part of a single-case
test's id and recorded for every case as the user property ``schedule`` (``--junitxml``).

``METAL_MARLIN_EMU_ORDER=<schedule> pytest tests/metal`` instead runs every case (single-case
functions once) under that one schedule, for checking the whole suite under each in turn
(docs/METAL.md); ``thread_order`` tests still run all four.
"""

from __future__ import annotations

import os
import zlib

import pytest

from metal_marlin_torch import emulator

needs_emulator = pytest.mark.skipif(
    not emulator.available(), reason="needs clang-19 (apt-get install clang-19) for the MSL emulator"
)

# The runtime's schedules (METAL_MARLIN_EMU_ORDER values).
SCHEDULES = ("forward", "reverse", "skew", "skew-reverse")
_ROTATED = pytest.StashKey[str]()
# A schedule given in the environment when the session starts replaces the rotation.
FORCED = os.environ.get("METAL_MARLIN_EMU_ORDER") or None
if FORCED is not None and FORCED not in SCHEDULES:
    raise pytest.UsageError(f"METAL_MARLIN_EMU_ORDER must be one of {', '.join(SCHEDULES)}, got {FORCED!r}")


def _offset(name: str) -> int:
    """A stable per-function start in the rotation, so that functions with few cases do not all
    start at 'forward' (crc32: the same on every run and machine, unlike hash())."""
    return zlib.crc32(name.encode())


def _is_single_case(metafunc: pytest.Metafunc) -> bool:
    if any(True for _ in metafunc.definition.iter_markers("parametrize")):
        return False
    # Parametrized fixtures (thread_order) also multiply the cases.
    return "thread_order" not in metafunc.fixturenames


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each single-case emulator test under two schedules (parametrizing `schedule`)."""
    if FORCED is not None:
        return
    if "emu" in metafunc.fixturenames and "schedule" in metafunc.fixturenames and _is_single_case(metafunc):
        off = _offset(metafunc.definition.nodeid)
        metafunc.parametrize("schedule", [SCHEDULES[off % 4], SCHEDULES[(off + 2) % 4]], indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give the i-th case of every test function the schedule SCHEDULES[(i + offset) % 4]."""
    count: dict[str, int] = {}
    for item in items:
        fn = getattr(item, "originalname", item.name)
        key = f"{item.nodeid.split('::')[0]}::{fn}"
        i = count.get(key, 0)
        count[key] = i + 1
        item.stash[_ROTATED] = FORCED or SCHEDULES[(i + _offset(key)) % 4]


@pytest.fixture(autouse=True)
def schedule(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The emulator schedule of this test case (see the module docstring); set in the
    environment, which the runtime reads at every launch."""
    if "thread_order" in request.fixturenames:
        return request.getfixturevalue("thread_order")
    name = getattr(request, "param", None) or request.node.stash.get(_ROTATED, "forward")
    monkeypatch.setenv("METAL_MARLIN_EMU_ORDER", name)
    request.node.user_properties.append(("schedule", name))
    return name


@pytest.fixture(scope="session")
def emu():
    """torch.ops.marlin_emu, built (or loaded from the cache) once per session."""
    if not emulator.available():
        pytest.skip("needs clang-19 (apt-get install clang-19) for the MSL emulator")
    return emulator.load().ops


@pytest.fixture(params=SCHEDULES)
def thread_order(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test under every schedule (module docstring): for the tests whose kernels
    exchange data through threadgroup memory, where a missing barrier would hide."""
    monkeypatch.setenv("METAL_MARLIN_EMU_ORDER", request.param)
    request.node.user_properties.append(("schedule", request.param))
    return request.param
