"""file_checks edge cases: home-relative paths, a JSON array after whitespace, blank lines, and
a JSON-lines file whose line is an array."""

from __future__ import annotations

import pytest

from datamodules.file_checks import (
    count_json_records,
    count_text_lines,
    where_relative_paths_resolve,
)


def test_a_home_relative_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert where_relative_paths_resolve("~/corpus.jsonl") == ""
    assert str(tmp_path) in where_relative_paths_resolve("data/corpus.jsonl")


def test_a_json_array_may_start_after_whitespace(tmp_path):
    path = tmp_path / "corpus.json"
    path.write_text('\n   [{"text": "a"},\n {"text": "b"}]\n')
    assert count_json_records(path, "text") == 2


def test_blank_lines_are_no_records_or_documents(tmp_path):
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert count_json_records(jsonl, "text") == 2
    txt = tmp_path / "corpus.txt"
    txt.write_text("first\n\n  \nsecond\n")
    assert count_text_lines(txt) == 2


def test_an_array_line_of_a_json_lines_file_is_a_bad_record(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('[{"text": "a"}, {"text": "b"}]\n')
    with pytest.raises(KeyError, match=r"corpus\.jsonl:1: record has no text field"):
        count_json_records(path, "text")


def test_a_text_field_that_is_no_string_is_named(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "a"}\n{"text": null}\n{"text": 5}\n')
    with pytest.raises(TypeError, match=r"corpus\.jsonl:3: text field 'text' holds a int \(5\)"):
        count_json_records(path, "text")
