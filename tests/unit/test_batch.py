"""`ensemble predict`'s input checks: each bad input stops before Ray with the fix named."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ensemble.batch import read_texts
from ensemble.cli import main
from ensemble.data import DataError


def test_texts_come_from_any_format_the_data_layer_reads(tmp_path):
    texts = ["a fine film", "NA", "None", "bad , really bad"]  # words, not missing values
    csv_path = tmp_path / "in.csv"
    csv_path.write_text("id,review\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(texts)))
    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.table({"review": texts, "stars": [1, 2, 3, 4]}), parquet)
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(f'{{"review": "{t}"}}\n' for t in texts))
    for path in (csv_path, parquet, jsonl):
        assert read_texts(path, "review") == texts


@pytest.mark.parametrize(
    ("name", "content", "column", "fragment"),
    [
        ("missing.csv", None, "text", "not found; pass the path"),
        ("in.xlsx", "text\nfine\n", "text", r"name it \*\.csv, \*\.tsv, \*\.json, \*\.jsonl"),
        ("in.csv", "text\n", "text", "has no rows; give it at least one text"),
        ("in.csv", "", "text", "has no rows"),
        ("in.csv", "sentence\nfine\n", "text", "no column 'text'.*Pass --text-column NAME"),
        ("in.csv", "txt\nfine\n", "text", "did you mean 'txt'"),
        ("in.csv", "text,x\nfine,1\n,2\n  ,3\n", "text", r"2 empty or null text\(s\).*\[1, 2\]"),
    ],
)
def test_bad_input_names_the_fix(tmp_path, name, content, column, fragment):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=fragment):
        read_texts(path, column)


def test_cli_refuses_a_missing_run_and_an_unknown_output_suffix(tmp_path, capsys):
    good = tmp_path / "in.csv"
    good.write_text("text\nfine\n")
    assert main(["predict", str(tmp_path / "nope"), str(good), "-o", str(tmp_path / "o.csv")]) == 2
    assert "is not a finished run directory; run `ensemble train" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), str(good), "-o", str(tmp_path / "o.xlsx")]) == 2
    err = capsys.readouterr().err
    assert "unknown output suffix '.xlsx'" in err and "*.parquet" in err
    assert not list(tmp_path.glob("*.parts"))  # nothing was started
