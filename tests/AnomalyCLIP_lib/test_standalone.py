"""``AnomalyCLIP_lib`` stands alone: copied without the rest of the repository, it imports and scores images."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import REPO_ROOT

LIBRARY = REPO_ROOT / "AnomalyCLIP_lib"
# Everything of the repository that is not the library: its packages and its top-level modules.
REPO_NAMES = frozenset({path.stem for path in REPO_ROOT.glob("*.py")}
                       | {path.name for path in REPO_ROOT.iterdir() if (path / "__init__.py").is_file()}) - {
    "AnomalyCLIP_lib"}

# Run in the child (only the copied library on its path) and in this process; prints/returns plain numbers.
_SCORE = r"""
import torch

import AnomalyCLIP_lib
from AnomalyCLIP_lib import scoring
from AnomalyCLIP_lib.inference import AnomalyCLIPInference, ScoringConfig


def score(backbone: str) -> dict:
    model, _ = AnomalyCLIP_lib.load(backbone)
    with torch.inference_mode():
        tokens = torch.zeros(2, 77, dtype=torch.long)  # start, two words, end (ids of CLIP's vocabulary)
        tokens[:, :4] = torch.tensor([[49406, 320, 1125, 49407], [49406, 320, 4295, 49407]])
        texts = model.encode_text(tokens)
        text_features = scoring.l2_normalize(texts.float())[None]
        module = AnomalyCLIPInference(model.visual, text_features, ScoringConfig(image_size=56, features_list=(6, 24)))
        images = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3))
        scores, maps = module(images)
    return {"scores": scores.tolist(), "map_sums": maps.double().sum(dim=(1, 2)).tolist()}
"""

_CHILD = _SCORE + r"""
import json, sys

try:
    import pipeline  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the repository is importable: the test would prove nothing")
assert AnomalyCLIP_lib.__file__.startswith(sys.argv[2]), AnomalyCLIP_lib.__file__
print(json.dumps(score(sys.argv[1])))
"""


def _absolute_imports(path: Path) -> set[str]:
    """First names of the absolute imports of a module (at any depth, lazy ones included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_library_imports_nothing_of_the_repository():
    assert {"pipeline", "deploy", "generate_dataset_json", "dataset", "utils"} <= REPO_NAMES  # the premise
    offending = {path.name: sorted(_absolute_imports(path) & REPO_NAMES) for path in sorted(LIBRARY.glob("*.py"))}
    assert {name: found for name, found in offending.items() if found} == {}


def test_copied_library_alone_loads_a_backbone_and_scores(tiny_clip_state, tmp_path):
    alone = tmp_path / "alone"
    shutil.copytree(LIBRARY, alone / "AnomalyCLIP_lib", ignore=shutil.ignore_patterns("__pycache__"))
    backbone = tmp_path / "backbone.pt"
    torch.save(tiny_clip_state, backbone)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env["PYTHONPATH"] = str(alone)
    done = subprocess.run([sys.executable, "-s", "-c", _CHILD, str(backbone), str(alone)], cwd=alone, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    alone_result = json.loads(done.stdout.strip().splitlines()[-1])

    namespace: dict = {}
    exec(compile(_SCORE, "score", "exec"), namespace)  # the same steps on the repository's library
    expected = namespace["score"](str(backbone))
    assert len(alone_result["scores"]) == 1 and alone_result == expected
