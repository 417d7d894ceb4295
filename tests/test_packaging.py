"""pyproject.toml's packaging: the wheel ``pip install .`` builds holds the packages and modules the code imports,
the web page's files and the paper's table, and its console commands run from the installed files alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of what pyproject.toml names (a build writes build/ beside its sources)."""
    source = tmp_path_factory.mktemp("source")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(ROOT / name, source / name)
    for package in {name.split(".")[0] for name in config["packages"]}:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for module in config["py-modules"]:
        shutil.copy(ROOT / f"{module}.py", source / f"{module}.py")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("anomalyclip-*.whl")
    return built


def test_wheel_holds_the_packages_data_and_entry_points(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(["git", "ls-files", "AnomalyCLIP_lib", "pipeline", "deploy", "generate_dataset_json"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert tracked and set(tracked) <= names  # every tracked source, the static files and the csv included
    assert {"pipeline/service/static/index.html", "pipeline/data/anomalyclip_paper_results.csv", "utils.py",
            "prompt_ensemble.py"} <= names
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "anomalyclip-serve = pipeline.console:serve" in text
    assert "anomalyclip-predict = pipeline.console:predict" in text
    assert not any(name.startswith(("tests/", "test.py", "train.py")) for name in names)  # no stdlib 'test' clash


def test_console_commands_run_from_the_installed_files(wheel, tmp_path):
    """pip install --target (no dependencies: they are this environment's): the commands' --help, and an import
    of the service and the torch path, with the repository off the path (cwd and PYTHONPATH elsewhere)."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HOME": str(tmp_path)}
    for command, usage in (("anomalyclip-serve", "--max_batch"), ("anomalyclip-predict", "--image_path")):
        done = subprocess.run([sys.executable, str(target / "bin" / command), "--help"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert usage in done.stdout
    code = ("import pipeline, pipeline.service.app, pipeline.loading, pipeline.evaluation, deploy.runtime, utils; "
            "print(pipeline.__file__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_relative_to(target)
