"""The ``exitwise.calibration`` package: its lazy exports resolve to their homes, and stay lazy."""

from __future__ import annotations

import importlib
import subprocess
import sys

import exitwise.calibration as calibration


def test_every_export_resolves_to_the_module_it_names():
    for name, module in calibration._EXPORTS.items():
        assert getattr(calibration, name) is getattr(importlib.import_module(module), name), name
    assert sorted(calibration.__all__) == sorted(calibration._EXPORTS)


def test_importing_the_package_loads_no_submodule():
    code = (
        "import sys, exitwise.calibration\n"
        "loaded = [m for m in sys.modules if m.startswith('exitwise.calibration.')]\n"
        "assert loaded == [], loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
