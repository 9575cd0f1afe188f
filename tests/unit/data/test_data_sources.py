"""Reading sources: every file type, folders and globs, hf: folders, and bad data messages."""

from __future__ import annotations

import json

import pytest

from finetune.data import DataError, build_data
from finetune.data.readers import FilePosition, read_file
from finetune.data.sources import resolve_source

GOOD = {"instruction": "Add two and two.", "output": "Four."}


def _build(cfg, tokenizer):
    return build_data(cfg, tokenizer, attention="sdpa", seed=0, micro_batch_size=1)


def _rows(path, **kwargs):
    return [(row, str(origin)) for row, origin, _ in read_file(path, **kwargs)]


def test_builtin_instructions_resolves_to_the_bundled_file(tokenizer, data_cfg):
    data = _build(data_cfg(path="builtin:instructions"), tokenizer)
    assert (data.stats.format, data.stats.rows) == ("alpaca", 4000)
    with pytest.raises(DataError, match="unknown built-in dataset 'builtin:nope'.*builtin:instructions"):
        resolve_source("builtin:nope", split="train", json_key=None, text_unit="line")


def test_missing_file_names_the_path_and_the_fix(tokenizer, data_cfg, tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as err:
        _build(data_cfg(path=str(missing)), tokenizer)
    assert f"data file not found: {missing}" in str(err.value) and "data.path" in str(err.value)
    with pytest.raises(DataError, match="data.path is not set"):
        _build(data_cfg(), tokenizer)


def test_json_array_and_records_under_a_key(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([GOOD, GOOD]))
    (tmp_path / "b.json").write_text(json.dumps({"version": 1, "data": [GOOD]}))
    (tmp_path / "c.json").write_text(json.dumps({"train": [GOOD], "test": [GOOD]}))
    assert [o for _, o in _rows(tmp_path / "a.json")] == [f"{tmp_path / 'a.json'}: record 1",
                                                           f"{tmp_path / 'a.json'}: record 2"]
    assert len(_rows(tmp_path / "b.json")) == 1
    with pytest.raises(DataError, match="data.json_key"):
        _rows(tmp_path / "c.json")
    assert len(_rows(tmp_path / "c.json", json_key="test")) == 1


def test_csv_with_a_multiline_field_keeps_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,output\n"Two\nlines",x\nthird,y\n')
    rows = _rows(path)
    assert rows == [({"instruction": "Two\nlines", "output": "x"}, f"{path}:2"),
                    ({"instruction": "third", "output": "y"}, f"{path}:4")]


def test_parquet_rows_and_resume_position(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    table = pa.table({"text": [f"doc {i}" for i in range(10)]})
    pq.write_table(table, path, row_group_size=3)
    assert [r["text"] for r, _ in _rows(path)] == [f"doc {i}" for i in range(10)]
    resumed = [r["text"] for r, _, _ in read_file(path, start=FilePosition(7, 8))]
    assert resumed == ["doc 7", "doc 8", "doc 9"]


@pytest.mark.parametrize("unit,expected", [
    ("line", ["one", "two", "three"]),
    ("paragraph", ["one\ntwo", "three"]),
    ("file", ["one\ntwo\n\nthree"]),
])
def test_txt_units(tmp_path, unit, expected):
    path = tmp_path / "d.txt"
    path.write_text("one\ntwo\n\nthree\n")
    assert [r["text"] for r, _ in _rows(path, text_unit=unit)] == expected


def test_folder_and_glob_read_every_supported_file(tokenizer, data_cfg, tmp_path, jsonl):
    jsonl([GOOD] * 2, "data/a.jsonl")
    jsonl([GOOD] * 3, "data/sub/b.jsonl")
    (tmp_path / "data" / "notes.md").write_text("ignored")
    assert _build(data_cfg(path=str(tmp_path / "data")), tokenizer).stats.rows == 5
    assert _build(data_cfg(path=str(tmp_path / "data" / "*.jsonl")), tokenizer).stats.rows == 2
    with pytest.raises(DataError, match="no data files match"):
        _build(data_cfg(path=str(tmp_path / "data" / "*.csv")), tokenizer)


def test_malformed_json_line_names_file_and_line(tokenizer, data_cfg, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"instruction": "x", "output": \n' +
                    json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:3: malformed JSON .*data.on_bad_row=skip"):
        _build(data_cfg(path=str(path)), tokenizer)
    data = _build(data_cfg(path=str(path), on_bad_row="skip"), tokenizer)
    assert (data.stats.rows, data.stats.skipped_rows) == (2, 1)
    assert data.stats.skip_reasons == {"malformed_json": 1}


def test_invalid_utf8_is_a_located_error_or_a_counted_skip(tokenizer, data_cfg, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"instruction": "\xff", "output": "x"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: invalid UTF-8"):
        _build(data_cfg(path=str(path)), tokenizer)
    data = _build(data_cfg(path=str(path), on_bad_row="skip"), tokenizer)
    assert data.stats.skip_reasons == {"invalid_utf8": 1}


def test_missing_field_lists_the_fields_found(tokenizer, data_cfg, jsonl):
    path = jsonl([GOOD, {"instruction": "Hi", "response": "Hello", "id": 7}], "d.jsonl")
    with pytest.raises(DataError) as err:
        _build(data_cfg(path=str(path), format="alpaca"), tokenizer)
    message = str(err.value)
    assert message.startswith(f"{path}:2: missing field 'output'")
    assert "found fields: instruction, response, id" in message
    assert "data.columns.output=COLUMN" in message


def test_empty_dataset_after_filtering(tokenizer, data_cfg, jsonl):
    path = jsonl([{"instruction": "x"}] * 3, "d.jsonl")
    with pytest.raises(DataError, match=r"no usable training rows in .*3 read, 3 skipped "
                                        r"\(missing_field: 3\)"):
        _build(data_cfg(path=str(path), format="alpaca", on_bad_row="skip"), tokenizer)


def _save_dataset(folder, rows):
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(folder))


def test_hf_save_to_disk_folder(tokenizer, data_cfg, tmp_path):
    _save_dataset(tmp_path / "saved", [GOOD] * 4)
    data = _build(data_cfg(path=f"hf:{tmp_path / 'saved'}"), tokenizer)
    assert (data.stats.format, data.stats.rows) == ("alpaca", 4)


def test_hf_dataset_dict_folder_picks_the_split(tokenizer, data_cfg, tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD] * 3),
                          "test": datasets.Dataset.from_list([GOOD])}).save_to_disk(
        str(tmp_path / "dd"))
    assert _build(data_cfg(path=f"hf:{tmp_path / 'dd'}", split="test"), tokenizer).stats.rows == 1
    with pytest.raises(DataError, match="no split 'validation'; the folder has train, test"):
        _build(data_cfg(path=f"hf:{tmp_path / 'dd'}", split="validation"), tokenizer)


def test_hf_folder_of_files_goes_through_datasets(tokenizer, data_cfg, jsonl, tmp_path):
    jsonl([GOOD] * 5, "raw/train.jsonl")
    data = _build(data_cfg(path=f"hf:{tmp_path / 'raw'}"), tokenizer)
    assert data.stats.rows == 5
    assert data.stats.sources[0]["path"] == f"hf:{tmp_path / 'raw'}"


def test_hf_hub_offline_says_how_to_use_a_local_copy(tokenizer, data_cfg, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        _build(data_cfg(path="hf:someorg/somedata"), tokenizer)
    message = str(err.value)
    assert "hub is unreachable" in message and "save_to_disk" in message
    assert "data.path=hf:DIR" in message
