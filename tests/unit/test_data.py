"""The data layer on the real SST data, the VADER lexicon and small files written per test."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ensemble.config import DataConfig
from ensemble.data import DataError, Splits, load_splits

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
REPO = Path(__file__).resolve().parents[2]


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def toy_rows(n: int = 60, classes: int = 3) -> list[dict]:
    """n rows, labels cycling 0..classes-1, intensity rising with the label."""
    return [
        {"id": f"r{i}", "text": f"text {i}", "label": i % classes, "intensity": (i % classes) / 2}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def sst() -> Splits:
    return load_splits(DataConfig(source=str(DATA / "sst")))


@pytest.fixture(scope="module")
def vader() -> Splits:
    return load_splits(DataConfig(source="vader_lexicon"))


def test_sst_has_the_official_splits_and_five_ordinal_classes(sst: Splits) -> None:
    assert {k: len(v) for k, v in sst.texts.items()} == {"train": 8544, "dev": 1101, "test": 2210}
    assert sst.num_labels() == 5 and sst.label_names == ["0", "1", "2", "3", "4"]
    assert sst.summary()["splits"]["train"]["per_class"] == {
        "0": 1092, "1": 2218, "2": 1624, "3": 2322, "4": 1288
    }  # fmt: skip
    for split in ("train", "dev", "test"):
        assert sst.labels[split].dtype == np.int64 and sst.intensity is not None
        x = sst.intensity[split]
        assert x.dtype == np.float32 and len(x) == len(sst.texts[split])
        assert 0.0 <= x.min() and x.max() <= 1.0
    assert sst.intensity_range() == (0.0, 1.0)
    ci = sst.class_intensity()
    assert len(ci) == 5 and np.all(np.diff(ci) > 0.1)
    edges = sst.intensity_edges()
    # SST-5 classes are cut at 0.2/0.4/0.6/0.8, and the edges sit between the nearest texts
    assert np.allclose(edges, [0.2, 0.4, 0.6, 0.8], atol=0.02)
    assert sst.texts["train"][0].startswith("The Rock is destined")


def test_splits_pickle_round_trip(sst: Splits) -> None:
    back = pickle.loads(pickle.dumps(sst))
    assert back.texts["dev"] == sst.texts["dev"]
    assert np.array_equal(back.labels["test"], sst.labels["test"])
    assert back.intensity_edges() == sst.intensity_edges()


def test_vader_lexicon_is_a_three_class_word_dataset(vader: Splits) -> None:
    sizes = {k: len(v) for k, v in vader.texts.items()}
    assert list(sizes) == ["train", "dev", "test"]
    assert 7400 <= sum(sizes.values()) <= 7600
    assert abs(sizes["dev"] - 0.1 * sum(sizes.values())) <= 2 and sizes["dev"] == sizes["test"]
    assert vader.label_names == ["negative", "neutral", "positive"]
    assert vader.intensity is not None
    for split in sizes:  # the class is the mean rating cut at +-1.0
        x, y = vader.intensity[split], vader.labels[split]
        assert np.all(x[y == 0] <= -1.0) and np.all(np.abs(x[y == 1]) < 1.0)
        assert np.all(x[y == 2] >= 1.0)
    lo, hi = vader.intensity_range()
    assert -4.0 <= lo < -3.0 and 3.0 < hi <= 4.0
    assert np.all(np.diff(vader.class_intensity()) > 1.0)
    all_texts = [t for split in sizes for t in vader.texts[split]]
    assert len(set(all_texts)) == len(all_texts)  # splits are disjoint; duplicates collapsed
    # stratified: every split has about the same class mix
    mix = {s: np.bincount(vader.labels[s], minlength=3) / sizes[s] for s in sizes}
    assert np.allclose(mix["dev"], mix["train"], atol=0.01)


def test_vader_split_is_deterministic_and_seeded(vader: Splits) -> None:
    again = load_splits(DataConfig(source="vader_lexicon"))
    assert again.texts == vader.texts
    other = load_splits(DataConfig(source="vader_lexicon", split_seed=1))
    assert other.texts["dev"] != vader.texts["dev"]
    assert sorted(other.texts["dev"] + other.texts["test"] + other.texts["train"]) == sorted(
        vader.texts["dev"] + vader.texts["test"] + vader.texts["train"]
    )


def test_single_file_gets_a_deterministic_stratified_split(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "all.csv", toy_rows(100, classes=4))
    cfg = DataConfig(source=str(path), dev_fraction=0.2, test_fraction=0.1)
    a, b = load_splits(cfg), load_splits(cfg)
    assert {k: len(v) for k, v in a.texts.items()} == {"train": 70, "dev": 20, "test": 10}
    assert a.texts == b.texts
    assert sorted(sum(a.texts.values(), [])) == sorted(f"text {i}" for i in range(100))
    assert np.bincount(a.labels["dev"]).tolist() == [5, 5, 5, 5]
    for split, texts in a.texts.items():  # rows stay in file order and keep their labels
        numbers = [int(t.split()[1]) for t in texts]
        assert numbers == sorted(numbers)
        assert a.labels[split].tolist() == [i % 4 for i in numbers]


def test_directory_with_validation_json_and_carved_test(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", toy_rows(40))
    rows = [{"text": "NA", "label": "positive", "intensity": 1.0}]  # "NA" is a word, not null
    rows += [{"text": "meh", "label": "neutral", "intensity": 0.5}]
    (tmp_path / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    names = ["negative", "neutral", "positive"]
    s = load_splits(DataConfig(source=str(tmp_path), label_names=names, test_fraction=0.25))
    assert s.texts["dev"] == ["NA", "meh"] and s.labels["dev"].tolist() == [2, 1]
    assert len(s.texts["test"]) == 10 and len(s.texts["train"]) == 30
    assert s.label_names == names


def test_files_mapping_names_the_split_files(tmp_path: Path) -> None:
    write_csv(tmp_path / "a.csv", toy_rows(30))
    write_csv(tmp_path / "b.csv", toy_rows(6))
    write_csv(tmp_path / "train.csv", toy_rows(3))  # ignored: data.files.train wins
    s = load_splits(DataConfig(source=str(tmp_path), files={"train": "a.csv", "dev": "b.csv"}))
    assert len(s.texts["train"]) + len(s.texts["test"]) == 30 and len(s.texts["dev"]) == 6


def test_json_array_and_parquet_with_string_labels(tmp_path: Path) -> None:
    rows = [
        {"sentence": f"s{i}", "y": ["bad", "ok", "good"][i % 3], "score": i % 3} for i in range(30)
    ]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    pd.DataFrame(rows[:9]).to_parquet(tmp_path / "dev.parquet")
    pd.DataFrame(rows[9:15]).to_parquet(tmp_path / "test.parquet")
    names = ["bad", "ok", "good"]
    cfg = DataConfig(
        source=str(tmp_path), text_column="sentence", label_column="y", intensity_column="score"
    )
    s = load_splits(dataclasses.replace(cfg, label_names=names))
    assert {k: len(v) for k, v in s.texts.items()} == {"train": 30, "dev": 9, "test": 6}
    assert s.labels["dev"].tolist() == [0, 1, 2] * 3
    assert s.class_intensity() == [0.0, 1.0, 2.0] and s.intensity_edges() == [0.5, 1.5]
    # without label_names the strings become classes in sorted order
    unnamed = load_splits(cfg)
    assert unnamed.label_names == ["bad", "good", "ok"]
    assert unnamed.labels["dev"].tolist() == [0, 2, 1] * 3


def test_no_intensity_column_and_sample_limits(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "all.csv", toy_rows(200))
    cfg = DataConfig(
        source=str(path), intensity_column=None, max_train_samples=50, max_eval_samples=7
    )
    s = load_splits(cfg)
    assert s.intensity is None
    assert {k: len(v) for k, v in s.texts.items()} == {"train": 50, "dev": 7, "test": 7}
    assert s.class_intensity() == [0.0, 0.5, 1.0] and s.intensity_range() == (0.0, 1.0)
    assert load_splits(cfg).texts == s.texts
    assert s.summary()["intensity_range"] is None


def test_class_intensity_fills_a_class_missing_from_train() -> None:
    s = Splits(
        texts={"train": ["a", "b", "c", "d"]},
        labels={"train": [0, 0, 2, 3]},
        intensity={"train": [0.0, 0.2, 0.5, 0.5]},
        label_names=["w", "x", "y", "z"],
    )
    assert np.allclose(s.class_intensity(), [0.1, 0.3, 0.5, 0.5])
    edges = s.intensity_edges()
    assert np.allclose(edges, [0.2, 0.4, 0.5]) and np.all(np.diff(edges) > 0)


def test_edges_sit_on_the_cut_the_labels_came_from() -> None:
    # VADER-like: neutral is a narrow band, the outer classes are wide, so the class means
    # (-2, 0, 2.5) put midpoints at -1 and 1.25, far from the cuts at -0.2 and 0.2
    x = [-4.0, -2.0, -0.3, -0.1, 0.0, 0.1, 0.3, 2.0, 4.0, 3.7]
    y = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    s = Splits(texts={"train": ["t"] * 10}, labels={"train": y}, intensity={"train": x},
               label_names=["neg", "neu", "pos"])
    assert np.allclose(s.intensity_edges(), [-0.2, 0.2])
    # overlapping classes have no clean cut: the midpoints of the class means decide
    s.intensity["train"][3] = -0.5  # a neutral text below a negative one
    means = np.array(s.class_intensity())
    assert np.allclose(s.intensity_edges(), (means[1:] + means[:-1]) / 2)


# ---------------------------------------------------------------- errors, each naming the fix


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist.*point data.source"):
        load_splits(DataConfig(source=str(tmp_path / "nope" / "data.csv")))
    with pytest.raises(DataError, match=r"no training file.*data.files.train"):
        load_splits(DataConfig(source=str(tmp_path)))
    write_csv(tmp_path / "train.csv", toy_rows(10))
    with pytest.raises(DataError, match=r"data.files.dev='dev2.csv' is not a file"):
        load_splits(DataConfig(source=str(tmp_path), files={"dev": "dev2.csv"}))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match=r"cannot tell the format of x.txt.*data.format"):
        load_splits(DataConfig(source=str(tmp_path / "x.txt")))


def test_missing_column_lists_columns_and_key(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "all.csv", toy_rows(10))
    with pytest.raises(DataError, match=r"no column 'sentence'.*\['id', 'text'.*data.text_column"):
        load_splits(DataConfig(source=str(path), text_column="sentence"))
    with pytest.raises(DataError, match=r"'intensty'.*did you mean 'intensity'.*intensity_column"):
        load_splits(DataConfig(source=str(path), intensity_column="intensty"))


def test_empty_split(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", toy_rows(10))
    write_csv(tmp_path / "dev.csv", [], columns=["text", "label", "intensity"])
    with pytest.raises(DataError, match=r"dev.csv has no data rows \(an empty split\)"):
        load_splits(DataConfig(source=str(tmp_path)))
    with pytest.raises(DataError, match=r"test split is empty.*data.test_fraction"):
        load_splits(DataConfig(source=str(tmp_path / "train.csv"), test_fraction=0.0))


def test_empty_and_null_texts_name_the_rows(tmp_path: Path) -> None:
    rows = toy_rows(10)
    rows[3]["text"], rows[7]["text"] = "", "   "
    path = write_csv(tmp_path / "all.csv", rows)
    with pytest.raises(
        DataError, match=r"2 empty or null text\(s\).*rows \[3, 7\] \(id \['r3', 'r7'"
    ):
        load_splits(DataConfig(source=str(path)))


def test_bad_intensities_name_the_rows(tmp_path: Path) -> None:
    rows = toy_rows(10)
    rows[2]["intensity"], rows[5]["intensity"], rows[6]["intensity"] = "high", "", "nan"
    path = write_csv(tmp_path / "all.csv", rows)
    with pytest.raises(DataError, match=r"3 missing, non-numeric.*'high'.*rows \[2, 5, 6\]"):
        load_splits(DataConfig(source=str(path)))


def test_labels_outside_the_label_set(tmp_path: Path) -> None:
    rows = toy_rows(10)
    rows[4]["label"] = 4
    path = write_csv(tmp_path / "all.csv", rows)
    names = ["neg", "neu", "pos"]
    with pytest.raises(DataError, match=r"\['4'\].*row \[4\].*data.label_names has 3 names"):
        load_splits(DataConfig(source=str(path), label_names=names))
    rows[4]["label"] = "great"
    path = write_csv(tmp_path / "all.csv", rows)
    with pytest.raises(DataError, match=r"\['great'\]"):
        load_splits(DataConfig(source=str(path), label_names=names))
    rows[4]["label"] = ""
    path = write_csv(tmp_path / "all.csv", rows)
    with pytest.raises(DataError, match=r"1 missing label\(s\) in 'label' at row \[4\]"):
        load_splits(DataConfig(source=str(path)))


def test_fewer_than_two_training_classes(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "all.csv", [{"text": f"t{i}", "label": 1} for i in range(10)])
    with pytest.raises(DataError, match=r"train split has 1 class\(es\) \['pos'\]; .*at least 2"):
        load_splits(DataConfig(source=str(path), intensity_column=None, label_names=["n", "pos"]))


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    rows = toy_rows(10)
    rows[1]["text"], rows[2]["intensity"], rows[3]["label"] = "", "x", 9
    path = write_csv(tmp_path / "all.csv", rows)
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(source=str(path), label_names=["a", "b", "c"]))
    assert all(part in str(err.value) for part in ("text(s)", "intensit", "label value"))


def test_unknown_hub_dataset_fails_clearly_and_data_imports_without_ray() -> None:
    code = (
        "import sys; sys.modules['ray'] = None; sys.modules['deepspeed'] = None\n"
        "from ensemble.config import DataConfig\n"
        "from ensemble.data import DataError, load_splits\n"
        "try:\n"
        "    load_splits(DataConfig(source='no-such-org/no-such-dataset-xyz'))\n"
        "except DataError as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # fail fast instead of retrying the network
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    msg = out.stdout
    assert "could not load data.source='no-such-org/no-such-dataset-xyz'" in msg
    assert "Hugging Face hub" in msg and "network" in msg and "local path" in msg
