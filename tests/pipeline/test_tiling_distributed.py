"""torchrun test.py --tile_size with two gloo processes: the outputs of one process."""

import json

import numpy as np
import pytest

from tests.pipeline.test_distributed import _test_args, _torchrun

pytestmark = pytest.mark.slow  # each run starts torchrun


@pytest.mark.parametrize("few_shot", [["--k_shot", "2"]], ids=["k_shot_2"])
def test_tiled_two_processes_equal_one(synthetic_datasets, design_args, trained_checkpoint, tmp_path, few_shot):
    """With references, so one pair of runs covers both: the tiled stream of views is sharded over the ranks, and
    each class's tiled memory is built on its owner rank and shared (a zero-shot tiled pair added ~20 s and
    nothing this one does not check; the untiled zero-shot pair is in test_distributed.py, and this pair is the
    suite's torchrun check of the few-shot memory too: built once per class by its owner rank, shared)."""
    target = synthetic_datasets[1]
    one, two = tmp_path / "one", tmp_path / "two"
    for save_path, nproc in ((one, 1), (two, 2)):
        args = [*_test_args(target, trained_checkpoint, save_path, design_args), "--tile_size", "32", *few_shot]
        completed = _torchrun(["test.py", *args], nproc)
        assert completed.returncode == 0, completed.stderr[-3000:]
    assert (one / "scores.csv").read_bytes() == (two / "scores.csv").read_bytes()
    assert (one / "thresholds.json").read_bytes() == (two / "thresholds.json").read_bytes()
    a, b = (json.loads((p / "results.json").read_text()) for p in (one, two))
    assert a["per_class"] == b["per_class"] and a["tiling"] == b["tiling"] and a["tiling"]["tile_size"] == 32
    assert a["few_shot"] == b["few_shot"] and a["few_shot"]["references_per_class"] == {"blobs": 2, "weave": 2}
    assert b["world_size"] == 2
    dump_one, dump_two = np.load(one / "dump.npz"), np.load(two / "dump.npz")
    for key in dump_one.files:
        assert np.array_equal(dump_one[key], dump_two[key]), key
