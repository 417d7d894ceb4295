"""An environment made from requirements-deploy.txt alone runs test_one_example.py --runtime (issue 22, item 7).

Installing the packages with pip would need the package index and takes about a minute, so the
environment is a venv without site packages (``python -m venv --without-pip``) whose one ``.pth``
file points at a folder of links to the packages of requirements-deploy.txt and their
dependencies, as installed in this interpreter (found through their ``RECORD``): nothing else
(torch included) is importable there. A module the deploy path needs and the file does not list
makes the run fail with ``ModuleNotFoundError``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO_ROOT
from tests.deploy_helpers import TINY_SIZE, random_prompt_learner, save_prompt_checkpoint

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def deploy_requirements(path: Path = REPO_ROOT / "requirements-deploy.txt") -> list[str]:
    """The project names listed in ``path`` (comments and blank lines skipped)."""
    names = []
    for line in path.read_text().splitlines():
        match = REQUIREMENT_NAME.match(line.split("#", 1)[0])
        if match:
            names.append(match.group(1))
    return names


def distribution_closure(names: list[str]) -> list[metadata.Distribution]:
    """The installed distributions of ``names`` and of everything they require (extras left out)."""
    seen: dict[str, metadata.Distribution] = {}
    pending = list(names)
    while pending:
        name = pending.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement for another platform or Python (its marker), not installed here
        seen[key] = dist
        pending += [REQUIREMENT_NAME.match(req).group(1) for req in dist.requires or () if "extra ==" not in req]
    return list(seen.values())


def link_packages(dists: list[metadata.Distribution], folder: Path) -> None:
    """Link every top-level entry (package, module, ``.libs``, dist-info) of ``dists`` into ``folder``."""
    folder.mkdir()
    for dist in dists:
        tops = {Path(str(file)).parts[0] for file in dist.files or () if not str(file).startswith("..")}
        for top in tops - {"__pycache__"}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)


def deploy_venv(root: Path) -> Path:
    """A venv that sees only requirements-deploy.txt's packages; returns its python."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True, timeout=30).stdout.strip()
    link_packages(distribution_closure(deploy_requirements()), root / "linked")
    (Path(site) / "deploy_requirements.pth").write_text(f"{root / 'linked'}\n")
    return python


@pytest.fixture(scope="module")
def onnx_export(tiny_clip_state, tiny_model, tmp_path_factory):
    """An ONNX export of the tiny backbone with random prompts, and two images."""
    from deploy import export
    from AnomalyCLIP_lib.inference import AnomalyCLIPInference
    from pipeline.config import ModelSpec, ScoringSpec
    from pipeline.loading import load_model_and_prompts, scoring_config

    root = tmp_path_factory.mktemp("deploy_install")
    torch.save(tiny_clip_state, root / "backbone.pt")
    save_prompt_checkpoint(random_prompt_learner(tiny_model), root / "prompts.pth")
    spec = ModelSpec(backbone=str(root / "backbone.pt"), image_size=TINY_SIZE, features_list=(6, 12, 18, 24))
    scoring = ScoringSpec(checkpoint_path=str(root / "prompts.pth"), sigma=4.0)
    model, prompt_learner, _ = load_model_and_prompts(spec, torch.device("cpu"), scoring.checkpoint_path)
    module = AnomalyCLIPInference.from_model(model, prompt_learner, scoring_config(spec, scoring))
    out = root / "export"
    out.mkdir()
    files = export.write_graph(module.export_copy(), out, "onnx")
    config = export.ExportConfig(checkpoint_path=scoring.checkpoint_path, out=str(out), model=spec,
                                 sigma=scoring.sigma, format="onnx")
    (out / "anomalyclip.json").write_text(json.dumps(export.build_manifest(config, module, files,
                                                                           {"image": 0.5, "pixel": 0.5})))
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / name)
    return root, out, images


def test_requirements_deploy_alone_run_an_export(onnx_export):
    root, model_dir, images = onnx_export
    python = deploy_venv(root)
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr  # the venv sees no torch
    completed = subprocess.run([str(python), str(REPO_ROOT / "test_one_example.py"), "--runtime", "onnxruntime",
                                "--model", str(model_dir), "--image_path", str(images),
                                "--save_path", str(root / "out")],
                               cwd=root, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = [line.split("\t") for line in completed.stdout.splitlines() if "\t" in line]
    assert [Path(fields[0]).name for fields in lines] == ["a.png", "b.png"]
    assert (root / "out" / "predictions.csv").is_file() and (root / "out" / "a.png.overlay.png").is_file()
