"""Checks of local corpus files before ``datasets`` reads them.

``datasets`` reports a bad byte, a malformed record or an empty file with a long traceback that
names neither the file nor the line; these checks name both and count the documents.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def where_relative_paths_resolve(path: str | Path) -> str:
    """What a missing-path error adds for a relative ``path``: where it was looked for.

    Paths in configs (``data/tokenizer``, ``data/corpus/...``) are relative to the directory
    ``mlo`` runs in, not to the config file; a run started elsewhere (a job script's scratch
    directory, ``--config /abs/path/to/configs/x.yaml``) otherwise only read "not found".
    """
    if Path(path).expanduser().is_absolute():
        return ""
    return (
        f" (looked for in the current directory {Path.cwd()}: relative paths, also those in "
        "configs, resolve against the directory mlo runs in, not the config file's; run from "
        "the repository root or give an absolute path)"
    )


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line; a byte that is not UTF-8 names ``path:line``."""
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                yield line_number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{line_number}: not UTF-8 text (byte {raw[err.start]:#04x} at "
                    f"column {err.start + 1}); re-encode the file as UTF-8"
                ) from err


def _check_record(record: object, text_field: str, where: str) -> None:
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise KeyError(
            f"{where}: record has no text field {text_field!r} (found {keys}); set data.text_field"
        )
    value = record[text_field]
    if value is not None and not isinstance(value, str):  # null is a blank document
        # datasets' filter failed on it with "'int' object has no attribute 'strip'"
        raise TypeError(
            f"{where}: text field {text_field!r} holds a {type(value).__name__} ({value!r:.40}), "
            "not a string"
        )


def _starts_with_array(path: Path) -> bool:
    """Whether the first non-blank character of the file is ``[``."""
    with path.open("rb") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped.startswith(b"[")
    return False


def count_json_records(path: Path, text_field: str) -> int:
    """Records of a JSON-lines file, or of a ``.json`` file holding one array of objects.

    Raises naming ``path:line`` (JSON lines) or ``path: record i`` (array) on the first bad one.
    """
    if path.suffix == ".json" and _starts_with_array(path):
        text = "".join(line for _, line in _decoded_lines(path))
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}:{err.lineno}: malformed JSON array ({err.msg}, column {err.colno})"
            ) from err
        for i, record in enumerate(records):
            _check_record(record, text_field, f"{path}: record {i}")
        return len(records)
    n_records = 0
    for line_number, text in _decoded_lines(path):  # streamed: corpora can be large
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_number}: malformed JSON line ({err.msg})") from err
        _check_record(record, text_field, f"{path}:{line_number}")
        n_records += 1
    return n_records


def count_text_lines(path: Path) -> int:
    """Non-blank lines of a plain-text file (one document each, as ``datasets``' text builder)."""
    return sum(1 for _, text in _decoded_lines(path) if text.strip())


def malformed_json_file(directory: Path) -> str | None:
    """``"FILE: line L column C: MESSAGE"`` for the first ``*.json`` file of ``directory`` that
    does not parse, or ``None``: ``json``'s own error (raised from inside ``transformers`` for a
    truncated ``tokenizer.json``) gives the line but not the file."""
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as err:
            return f"{path}: line {err.lineno} column {err.colno}: {err.msg}"
    return None
