"""pcbench's build prints no deprecation warning (a deprecated pyproject setting stops building one
day), and CI's check (scripts/build-warnings.sh, run by scripts/test.sh on its install's log) finds
the ones of pcbench's build and only those."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BUILD_METADATA = """
import sys
from setuptools.build_meta import prepare_metadata_for_build_wheel
print(prepare_metadata_for_build_wheel(sys.argv[1]))
"""


def _build_metadata(tmp: Path, pyproject: str) -> subprocess.CompletedProcess:
    """setuptools' metadata build (what pip's install runs first) of pcbench with `pyproject`."""
    src = tmp / "src"
    shutil.copytree(ROOT / "pcbench", src / "pcbench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "README.md", src)
    (src / "pyproject.toml").write_text(pyproject)
    (tmp / "out").mkdir()
    return subprocess.run([sys.executable, "-c", BUILD_METADATA, str(tmp / "out")], cwd=src, capture_output=True,
                          text=True, timeout=300)


def test_metadata_builds_without_deprecation_warnings(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__}: the SPDX license needs >= 77 (pip's build gets it)")
    pyproject = (ROOT / "pyproject.toml").read_text()
    r = _build_metadata(tmp_path / "now", pyproject)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eprecat" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    meta = next((tmp_path / "now" / "out").glob("*.dist-info")) / "METADATA"
    assert "License-Expression: MIT" in meta.read_text()
    # The check sees the warning it exists for: the old TOML-table form of the license.
    old = pyproject.replace('license = "MIT"', 'license = { text = "MIT" }')
    assert old != pyproject
    r = _build_metadata(tmp_path / "old", old)
    assert "SetuptoolsDeprecationWarning" in r.stderr and "project.license" in r.stderr, r.stderr[-3000:]


OURS = """\
Obtaining file:///src/pcbench
  Installing build dependencies: finished with status 'done'
  Getting requirements to build editable: started
  Running command Getting requirements to build editable
  /x/setuptools/config/_apply_pyprojecttoml.py:82: SetuptoolsDeprecationWarning: `project.license` as a TOML table is deprecated
  running egg_info
  Getting requirements to build editable: finished with status 'done'
"""
OTHERS = """\
Collecting oldpkg
  Preparing metadata (pyproject.toml): started
  Running command Preparing metadata (pyproject.toml)
  /x/setuptools/dist.py:1: SetuptoolsDeprecationWarning: something of oldpkg is deprecated
  Preparing metadata (pyproject.toml): finished with status 'done'
Building wheels for collected packages: pcbench, oldpkg
  Building editable for pcbench (pyproject.toml): started
  Running command Building editable for pcbench (pyproject.toml)
  running editable_wheel
  Building editable for pcbench (pyproject.toml): finished with status 'done'
"""

# pip >= 25 prints the backend's warnings after a step's "finished" line (verbose or not).
OURS_NEW_PIP = """\
Obtaining file:///src/pcbench
  Getting requirements to build editable: started
  Getting requirements to build editable: finished with status 'done'
  /x/setuptools/config/_apply_pyprojecttoml.py:82: BuildBackendWarning: `project.license` as a TOML table is deprecated
  !!
  Preparing editable metadata (pyproject.toml): started
  Preparing editable metadata (pyproject.toml): finished with status 'done'
"""
OTHERS_NEW_PIP = """\
Collecting oldpkg
  Preparing metadata (pyproject.toml): started
  Preparing metadata (pyproject.toml): finished with status 'done'
  /x/setuptools/dist.py:1: BuildBackendWarning: something of oldpkg is deprecated
Building wheels for collected packages: pcbench
  Building editable for pcbench (pyproject.toml): started
  Building editable for pcbench (pyproject.toml): finished with status 'done'
  Created wheel for pcbench: filename=pcbench-0.1.0-0.editable-py3-none-any.whl
Collecting otherpkg
  /x/otherpkg/setup.py:1: DeprecationWarning: of otherpkg, oldpkg
"""


@pytest.mark.parametrize("log, found", [(OURS, True), (OTHERS, False), (OTHERS + OURS, True),
                                        (OTHERS + "DEPRECATION: Building 'pcbench' using the legacy setup.py\n", True),
                                        (OURS_NEW_PIP, True), (OTHERS_NEW_PIP, False), (OTHERS_NEW_PIP + OURS_NEW_PIP, True)])
def test_ci_check_finds_the_deprecations_of_our_build_only(tmp_path, log, found):
    f = tmp_path / "pip.log"
    f.write_text(log)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "build-warnings.sh"), str(f)], capture_output=True, text=True)
    assert r.returncode == (1 if found else 0), r
    assert ("eprecat" in r.stdout.lower()) == found and "oldpkg" not in r.stdout
