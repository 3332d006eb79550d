"""Build the bundled English corpus in ``data/corpus/`` from text that ships with CPython.

Sources (both under the PSF License 2.0, a permissive licence):

* ``pydoc_data.topics``: the prose of the Python Language Reference and Library Reference
  topics that ``help()`` shows;
* module, class and function docstrings of a fixed list of standard-library modules.

The output is deterministic for a given CPython version; the committed copy was made with the
version recorded in ``data/corpus/README.md``. Run:  python scripts/build_corpus.py
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import re
import sys
from pathlib import Path

DOCSTRING_MODULES = (
    "argparse", "asyncio.events", "bisect", "calendar", "collections", "concurrent.futures._base",
    "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fractions", "functools", "heapq", "http.client", "inspect", "ipaddress",
    "itertools", "json", "logging", "mailbox", "multiprocessing.pool", "os", "pathlib",
    "pickle", "pprint", "queue", "random", "re", "sched", "shutil", "socket", "sqlite3",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "typing", "unittest.case", "urllib.parse", "uuid", "warnings",
    "wave", "weakref", "xml.dom.minidom", "zipfile",
)  # fmt: skip


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def topic_documents() -> list[dict]:
    from pydoc_data.topics import topics

    return [
        {"id": f"topic/{name}", "source": "pydoc_data.topics", "text": _clean(body)}
        for name, body in sorted(topics.items())
    ]


def docstring_documents() -> list[dict]:
    documents = []
    for module_name in DOCSTRING_MODULES:
        spec = importlib.util.find_spec(module_name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        parts = [ast.get_docstring(tree) or ""]
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80 and not node.name.startswith("_"):
                    parts.append(f"{node.name}: {doc}")
        text = _clean("\n\n".join(p for p in parts if p))
        if text:
            documents.append(
                {"id": f"docstrings/{module_name}", "source": module_name, "text": text}
            )
    return documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/corpus/python_docs.jsonl"))
    args = parser.parse_args()
    documents = topic_documents() + docstring_documents()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    n_chars = sum(len(d["text"]) for d in documents)
    print(f"wrote {len(documents)} documents, {n_chars:,} characters to {args.out}")
    print(f"python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
