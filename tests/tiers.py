"""Test tiers: `slow` marks the tests that run visiond in a child, train, serve RTSP or drive Chromium.

`make test-fast` (`pytest -m "not slow"`) runs the rest in a couple of minutes after
every change; `make test` still runs everything. A test is slow when it, a fixture it
uses, or a helper of the test tree it calls (followed through any depth) reaches one of
SLOW_CAUSES or starts a Python child that runs visiond (each one imports the package,
most of them torch: one to eight seconds apiece), so a new test of that kind is slow
without anyone remembering to mark it. `@pytest.mark.slow` in a test file covers what
this cannot see: a large export, a long in-process run.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import types
import warnings
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# "module.qualname" of a callable -> what reaching it costs.
SLOW_CAUSES = {
    "visiond.harness.child.DaemonProcess": "starts a visiond daemon",
    "daemon_helpers.Daemon": "starts a visiond daemon",
    "daemon_helpers.trained_line_model": "trains a model",
    "loop_helpers.trained_model": "trains a model",
    "visiond.train.loop.train": "trains a model",
    "conftest.start_rtsp_server": "starts an RTSP server",
}
# Names so specific that naming them is enough (used through a local import).
SLOW_NAMES = {"sync_playwright": "drives Chromium"}
# A command line or script that runs the package (beside `"-m", "visiond"` as two strings).
_VISIOND_CHILD = re.compile(r"-m visiond\b|(from|import) visiond\b")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = [cause for cause in SLOW_CAUSES if not _exists(cause)]
    if missing:  # a helper moved or renamed: its tests would land in the fast tier unnoticed
        warnings.warn(pytest.PytestConfigWarning(f"tests/tiers.py: SLOW_CAUSES names {missing}, which no longer "
                                                 "exist; point them at where those helpers live now"), stacklevel=1)
    reach = SlowReach()
    for item in items:
        if item.get_closest_marker("slow") is None:
            why = reach.of_item(item)
            if why:
                item.add_marker(pytest.mark.slow(reason=why))


class SlowReach:
    """Follows a test's code, its fixtures' code and the test tree's helpers to a slow cause."""

    def __init__(self) -> None:
        self._known: dict[int, str | None] = {}

    def of_item(self, item: pytest.Item) -> str | None:
        function = getattr(item, "function", None)
        why = self.of(function) if function is not None else None
        if why:
            return why
        name2defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        for name in getattr(item, "fixturenames", ()):
            defs = name2defs.get(name)
            why = self.of(defs[-1].func) if defs else None
            if why:
                return f"{why} (fixture {name})"
        return None

    def of(self, obj: object) -> str | None:
        """Why reaching `obj` is slow, or None."""
        cause = SLOW_CAUSES.get(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
        if cause or not _in_test_tree(obj):
            return cause
        key = id(obj)
        if key not in self._known:
            self._known[key] = None  # a helper that calls itself stops here
            self._known[key] = self._of_class(obj) if isinstance(obj, type) else self._of_function(obj)
        return self._known[key]

    def _of_class(self, cls: type) -> str | None:
        for base in cls.__mro__[1:]:
            why = self.of(base)
            if why:
                return why
        for attr in vars(cls).values():
            attr = attr.fget if isinstance(attr, property) else getattr(attr, "__func__", attr)
            if isinstance(attr, types.FunctionType):
                why = self.of(attr)
                if why:
                    return why
        return None

    def _of_function(self, function: object) -> str | None:
        function = inspect.unwrap(function)
        code = getattr(function, "__code__", None)
        if code is None:
            return None
        namespace = getattr(function, "__globals__", {})
        names = _names(code)
        strings = _strings(code) + [v for v in map(namespace.get, names) if isinstance(v, str)]  # module-level scripts
        if "executable" in names and _runs_visiond(strings):
            return "runs visiond in a child Python"
        for name in names:
            if name in SLOW_NAMES:
                return SLOW_NAMES[name]
        for cause, why in SLOW_CAUSES.items():  # `from module import name` inside the function
            module, _, name = cause.rpartition(".")
            if module in names and name in names:
                return why
        for name in names:
            if name in namespace:
                why = self.of(namespace[name])
                if why:
                    return why
        return None


def _names(code: types.CodeType) -> set[str]:
    """Every global, attribute and imported name a function and its nested functions use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _runs_visiond(strings: list[str]) -> bool:
    return ("-m" in strings and "visiond" in strings) or any(_VISIOND_CHILD.search(text) for text in strings)


def _strings(code: types.CodeType) -> list[str]:
    """The string constants of a function and its nested functions (command lines, scripts)."""
    found = []
    for const in code.co_consts:
        if isinstance(const, str):
            found.append(const)
        elif isinstance(const, (tuple, frozenset)):
            found += [c for c in const if isinstance(c, str)]
        elif isinstance(const, types.CodeType):
            found += _strings(const)
    return found


def _exists(cause: str) -> bool:
    module, _, qualname = cause.rpartition(".")
    try:
        obj = importlib.import_module(module)
    except ImportError:
        return False
    return getattr(obj, qualname, None) is not None


def _in_test_tree(obj: object) -> bool:
    if not isinstance(obj, (type, types.FunctionType)) and not hasattr(obj, "__wrapped__"):
        return False
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    path = getattr(module, "__file__", None)
    return path is not None and Path(path).resolve().parent == TESTS
