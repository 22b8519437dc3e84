"""A built wheel works outside the source tree: configs ship as package data.

Builds the wheel from a copy of the repository, installs it into a fresh virtual environment
that reuses the installed dependencies (torch & co.: ``--system-site-packages``; no network,
``--no-deps --no-index``), and runs the installed ``fuseseg`` (config show, --version, run --dry-run)
from an empty folder.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def sh(*cmd, cwd: Path, env=None) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_wheel_installs_and_runs_from_an_empty_folder(tmp_path):
    src = tmp_path / "src"
    top = {".git", "results", "build", "dist", "data", ".pytest_cache", ".ruff_cache"}   # only at the top:
    shutil.copytree(REPO, src, ignore=lambda d, names: [   # fuseseg/data is a package
        n for n in names if (Path(d) == REPO and n in top) or n == "__pycache__" or n.endswith(".egg-info")])
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src,
       cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("fuseseg-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        assert "fuseseg/data/__init__.py" in z.namelist() and "pipelines/commands/run.py" in z.namelist()
        # the installed top-level names: the three the user imports, and the project's own foundations;
        # no generic name more (benchmarks/ stays in the checkout)
        assert {n.split("/")[0] for n in z.namelist() if ".dist-info/" not in n} == {
            "fuseseg", "fusion", "segmentation", "pipelines"}
        for cfg in sorted((REPO / "configs").glob("*.yaml")):   # every shipped config, byte for byte
            assert z.read(f"pipelines/configs/{cfg.name}") == cfg.read_bytes()

    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=tmp_path)
    py, exe = venv / "bin" / "python", venv / "bin" / "fuseseg"
    sh(py, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel, cwd=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["COLUMNS"] = "200"
    code = "import pipelines, fuseseg.data; print(pipelines.__file__); print(fuseseg.data.__file__)"
    for where in sh(py, "-c", code, cwd=empty, env=env).stdout.split():
        assert where.startswith(str(venv)), f"imported {where}, not the installed wheel"
    r = sh(exe, "config", "show", cwd=empty, env=env)   # the default config, found in the package
    assert "name: default" in r.stdout
    r = sh(exe, "config", "show", "msrs", cwd=empty, env=env)
    assert str(venv) in r.stdout.splitlines()[0] and "name: msrs-paper" in r.stdout
    assert sh(exe, "--version", cwd=empty, env=env).stdout.startswith("fuseseg 0.")
    r = sh(exe, "run", "--dry-run", cwd=empty, env=env)   # the shipped default: every stage to run, nothing written
    assert "name: default" in r.stdout and "12 of 12 stages would run." in r.stdout
    assert "run  train_fusion/sspfusion" in r.stdout and "never run here" in r.stdout
    assert list(empty.iterdir()) == []
