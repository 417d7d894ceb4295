"""pipeline/reproduction.py: the copied published numbers, the seed statistics and the settings check.

The expected values are typed in from the paper's Tables 1 and 2 and the released logs (as the
method spec §10 lists them), not read from the data file under test.
"""

from __future__ import annotations

import math

import pytest

from pipeline import reproduction

# (image AUROC, image AP, pixel AUROC, pixel AUPRO); None: not reported
PAPER = {
    "mvtec": (91.5, 96.2, 91.1, 81.4), "visa": (82.1, 85.4, 95.5, 87.0), "mpdd": (77.0, 82.0, 96.5, 88.7),
    "btad": (88.3, 87.3, 94.2, 74.8), "sdd": (84.7, 80.0, 90.6, 67.8), "dagm": (97.5, 92.3, 95.6, 91.0),
    "dtd": (93.5, 97.0, 97.9, 92.3), "headct": (93.4, 91.6, None, None), "brainmri": (90.3, 92.2, None, None),
    "br35h": (94.6, 94.7, None, None), "covid": (80.1, 58.7, None, None), "isic": (None, None, 89.7, 78.4),
    "colondb": (None, None, 81.9, 71.3), "clinicdb": (None, None, 82.9, 67.8), "kvasir": (None, None, 78.9, 45.6),
    "endo": (None, None, 84.1, 63.6), "tn3k": (None, None, 81.5, 50.4),
}
RELEASED_LOG = {"mvtec": (91.6, 96.4, 91.1, 81.4), "visa": (82.0, 85.3, 95.5, 86.7)}
ORDER = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")


@pytest.mark.parametrize("source, expected", [("paper", PAPER), ("released_log", RELEASED_LOG)])
def test_the_published_table_holds_every_value(source: str, expected: dict) -> None:
    table = reproduction.published_table(source)
    wanted = {name: {m: v for m, v in zip(ORDER, values) if v is not None} for name, values in expected.items()}
    assert {name: dict(values) for name, values in table.values.items()} == wanted


def test_datasets_are_found_by_the_papers_name_too() -> None:
    table = reproduction.published_table("paper")
    assert table.lookup("MVTec AD")["image_auroc"] == 91.5 and table.lookup("mvtec_ad")["image_ap"] == 96.2
    assert table.lookup("CVC-ClinicDB")["pixel_aupro"] == 67.8 and table.lookup("DTD-Synthetic")["pixel_auroc"] == 97.9
    assert table.lookup("my-parts") == {}
    assert reproduction.published_table("released_log").lookup("mpdd") == {}  # in the paper only
    with pytest.raises(reproduction.AnomalyCLIPError, match="--paper table9: choose one of paper, released_log"):
        reproduction.published_table("table9")


def test_stats_are_the_mean_and_sample_standard_deviation_of_the_defined_values() -> None:
    # 0.5, 0.6, 0.9 -> 50, 60, 90: mean 66.667, squares of deviations 277.8 + 44.4 + 544.4 = 866.67, / 2 -> 20.817
    result = reproduction.stats([0.5, None, 0.6, float("nan"), 0.9])
    assert result.n == 3 and math.isclose(result.mean, 200 / 3)
    assert math.isclose(result.std, math.sqrt(((50 - 200 / 3) ** 2 + (60 - 200 / 3) ** 2 + (90 - 200 / 3) ** 2) / 2))
    assert reproduction.stats([0.25]) == reproduction.Stats(25.0, None, 1)
    assert reproduction.stats([None]) == reproduction.Stats(None, None, 0)


def test_a_backbone_file_with_the_registered_hash_is_the_released_backbone() -> None:
    from AnomalyCLIP_lib.pretrained import backbone_sha256

    registered = backbone_sha256("ViT-L/14@336px")
    config = {"backbone": "/models/ViT-L-14-336px.pt"}
    same = reproduction.Run(folder=None, dataset="visa", mean={}, config=config, backbone_sha256=registered)
    other = reproduction.Run(folder=None, dataset="visa", mean={}, config=config, backbone_sha256="0" * 64)
    assert reproduction.differences(same) == []
    assert reproduction.differences(other) == [
        reproduction.Difference("backbone", "/models/ViT-L-14-336px.pt", "ViT-L/14@336px")]


def test_a_results_json_without_the_new_flags_is_zero_shot_and_untiled() -> None:
    old = reproduction.Run(folder=None, dataset="visa", mean={}, config={"image_size": 518, "sigma": 4})
    assert reproduction.differences(old) == []
    zero = reproduction.Run(folder=None, dataset="visa", mean={}, config={"k_shot": 0, "tile_size": None})
    assert reproduction.differences(zero) == []


def test_the_few_shot_setting_names_where_the_references_come_from() -> None:
    assert reproduction.few_shot_text({"k_shot": 0, "reference_path": None}) is None
    assert reproduction.few_shot_text({"k_shot": 4}) == "4 from the train normals"
    assert reproduction.few_shot_text({"k_shot": 2, "references_from_test": True, "memory_weight": 0.3}) == (
        "2 from the test normals; memory weight 0.3")
    assert reproduction.few_shot_text({"k_shot": 0, "reference_path": "refs"}) == "all of refs"
