"""The project as a user installs it: a wheel (not an editable checkout) runs `eleatt demo` with its own configs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_configs_are_package_data():
    shipped = REPO / "pipeline" / "configs"
    assert shipped.is_dir() and (shipped / "features_lstm.yaml").is_file()
    assert sorted(p.name for p in shipped.glob("*.yaml")) == sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert "MIT License" in (REPO / "LICENSE").read_text()


@pytest.mark.slow  # builds a wheel and runs the quick demo from it (~1-2 minutes on a loaded CPU)
def test_a_wheel_runs_the_demo_outside_the_checkout(tmp_path):
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for name in ("pipeline", "preprocessing", "configs"):
        shutil.copytree(REPO / name, source / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(tmp_path / "dist")],
                   check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("eleatt-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "pipeline/configs/features_lstm.yaml" in names and any(n.endswith("licenses/LICENSE") for n in names)
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)

    # The dependencies come from this interpreter; the project only from the wheel (no checkout on the path).
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(target)
    result = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--quick", "--out", str(work / "demo")],
                            cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "demo done" in result.stdout
