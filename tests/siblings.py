"""One test module's helpers used from another.

`sibling("test_nodes")` runs tests/test_nodes.py once per session under a private module name
(`_wan22_test_nodes`), so its fixtures and module-level set-up are not collected twice by pytest
and not executed again by every test file that borrows from it."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def sibling(name: str) -> ModuleType:
    key = f"_wan22_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]
