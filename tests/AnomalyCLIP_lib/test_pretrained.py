"""Backbone registry: cache folder, hash-checked atomic download, clear offline error (no network used)."""

import hashlib
from pathlib import Path

import pytest

from AnomalyCLIP_lib import pretrained
from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.pretrained import PretrainedWeights


def test_vit_l14_336_is_registered_with_openai_url_and_hash():
    weights = pretrained.PRETRAINED["ViT-L/14@336px"]
    assert weights.url == (
        "https://openaipublic.azureedge.net/clip/models/"
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt"
    )
    assert weights.sha256 == "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"
    assert weights.filename == "ViT-L-14-336px.pt"


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("ANOMALYCLIP_CACHE", str(tmp_path / "env"))
    assert pretrained.cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert pretrained.cache_dir() == tmp_path / "env"
    monkeypatch.delenv("ANOMALYCLIP_CACHE")
    assert pretrained.cache_dir() == Path("~/.cache/clip").expanduser()


def _register(monkeypatch, source: Path, sha256: str) -> None:
    monkeypatch.setitem(pretrained.PRETRAINED, "test-model",
                        PretrainedWeights(url=source.as_uri(), sha256=sha256, filename="test-model.pt"))


def test_download_verifies_hash_and_uses_cache(monkeypatch, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"weights" * 1000)
    _register(monkeypatch, source, hashlib.sha256(source.read_bytes()).hexdigest())
    cache = tmp_path / "cache"
    path = pretrained.download("test-model", cache)
    assert path == cache / "test-model.pt" and path.read_bytes() == source.read_bytes()
    source.unlink()  # a verified cached file is used without downloading again
    assert pretrained.download("test-model", cache) == path
    assert [p.name for p in cache.iterdir()] == ["test-model.pt"]


def test_download_with_wrong_hash_leaves_nothing_behind(monkeypatch, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"corrupted")
    _register(monkeypatch, source, "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(AnomalyCLIPError, match="SHA-256"):
        pretrained.download("test-model", cache)
    assert list(cache.iterdir()) == []


def test_offline_error_names_url_file_and_folder(monkeypatch, tmp_path):
    monkeypatch.setitem(pretrained.PRETRAINED, "test-model",
                        PretrainedWeights(url="http://127.0.0.1:9/never/test-model.pt", sha256="0" * 64,
                                          filename="test-model.pt"))
    with pytest.raises(AnomalyCLIPError) as info:
        pretrained.download("test-model", tmp_path / "cache", timeout_s=5)
    message = str(info.value)
    assert "http://127.0.0.1:9/never/test-model.pt" in message
    assert "test-model.pt" in message and str(tmp_path / "cache") in message
    assert "\n" not in message
    assert list((tmp_path / "cache").iterdir()) == []


def test_unknown_name_lists_choices():
    with pytest.raises(AnomalyCLIPError, match="ViT-L/14@336px"):
        pretrained.download("ViT-B/99")
