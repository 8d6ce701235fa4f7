"""Reading prompt files (JSONL or CSV) for the classifier, and hashing training data.

Every malformed row is reported as ``file:line: what is wrong``.

Example:
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "p.jsonl"
    >>> _ = f.write_text('{"text": "Who is Yoda?", "split": "train"}\\n{"text": "Hi", "split": "dev"}\\n')
    >>> read_prompts(f, split="train")
    ['Who is Yoda?']
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eco_guard.errors import DataError

__all__ = ["TrainingData", "data_hash", "read_prompts", "read_rows", "read_terms", "suggest_terms"]

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


def read_prompts(source: Any, *, split: str | None = None) -> list[str]:
    """The ``text`` of every row of a JSONL or CSV file, optionally only one split.

    Args:
        source: a ``DataSource`` (``.path``, ``.split``), or a path.
        split: keep rows whose ``split`` field equals it (overrides the source's own split).

    Raises:
        DataError: missing file, unknown type, or a malformed row (names file and line).
    """
    return [row["text"] for row in read_rows(source, split=split)]


def read_rows(source: Any, *, split: str | None = None) -> list[dict[str, Any]]:
    """Every row of a JSONL or CSV prompt file as a dict with a non-empty ``text``.

    Each row also gets ``_file`` and ``_line`` (where it came from) for error messages.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
    else:  # a DataSource
        path, split = Path(source.path), split if split is not None else source.split
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        rows = list(_jsonl_rows(path))
    elif suffix == ".csv":
        rows = list(_csv_rows(path))
    else:
        raise DataError(f"{path}: unsupported data file type {suffix!r} (use .jsonl or .csv)")
    for row in rows:
        _check_row(row, split)
    return [r for r in rows if split is None or r.get("split") == split]


def _jsonl_rows(path: Path) -> Any:
    for line_no, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}:{line_no}: not valid UTF-8") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object with a 'text' field, got {type(row).__name__}")
        yield {**row, "_file": str(path), "_line": line_no}


def _csv_rows(path: Path) -> Any:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_no = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line_no}: not valid UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if not reader.fieldnames or "text" not in reader.fieldnames:
            raise DataError(f"{path}:1: no 'text' column (columns: {', '.join(reader.fieldnames or []) or 'none'})")
        for row in reader:
            if None in row:  # more cells than header columns
                raise DataError(f"{path}:{reader.line_num}: {len(reader.fieldnames) + len(row[None])} cells, "
                                f"but the header has {len(reader.fieldnames)} columns")
            yield {**row, "_file": str(path), "_line": reader.line_num}
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def _check_row(row: dict[str, Any], split: str | None) -> None:
    where = f"{row['_file']}:{row['_line']}"
    text = row.get("text")
    if text is None:
        raise DataError(f"{where}: missing 'text' field")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: 'text' must be a non-empty string, got {text!r}")
    if split is not None and "split" not in row:
        raise DataError(f"{where}: no 'split' field, but split {split!r} was asked for")


def read_terms(items: Sequence[Any]) -> list[str]:
    """Topic terms from a config's ``terms`` list: strings as they are, files (``.path``) one term per line.

    Blank lines and ``#`` comments are skipped; duplicates are dropped, order kept.

    Raises:
        DataError: a missing or non-UTF-8 terms file (names the file and line).
    """
    terms: list[str] = []
    for item in items:
        if isinstance(item, str):
            terms.append(item.strip())
            continue
        path = Path(item.path if hasattr(item, "path") else item)
        if not path.is_file():
            raise DataError(f"{path}: terms file not found")
        for line_no, raw in enumerate(path.read_bytes().splitlines(), start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{line_no}: not valid UTF-8") from None
            terms.append(line.split("#", 1)[0].strip())
    return list(dict.fromkeys(t for t in terms if t))


@dataclass(frozen=True)
class TrainingData:
    """Everything a config gives the classifier to train on, read from its files.

    ``positives``/``negatives`` come from files that may be held out; ``train_only_*`` from
    files marked ``holdout: false``.
    """

    positives: dict[str, list[str]]
    negatives: list[str]
    train_only_positives: dict[str, list[str]]
    train_only_negatives: list[str]
    terms: dict[str, list[str]]
    contrast_terms: list[str]
    weak_terms: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Any) -> TrainingData:
        """Read a ``GuardConfig``'s data files and term lists (errors name file and line)."""
        def prompts(sources: Sequence[Any], holdout: bool) -> list[str]:
            return [p for src in sources if src.holdout == holdout for p in read_prompts(src)]

        return cls({t.name: prompts(t.data, True) for t in cfg.topics}, prompts(cfg.classifier.negatives, True),
                   {t.name: prompts(t.data, False) for t in cfg.topics}, prompts(cfg.classifier.negatives, False),
                   {t.name: read_terms(t.terms) for t in cfg.topics}, read_terms(cfg.classifier.contrast_terms),
                   {t.name: read_terms(t.weak_terms) for t in cfg.topics})

    def hash(self) -> str:
        """:func:`data_hash` of all of it."""
        return data_hash(self.positives, self.negatives, self.terms, self.contrast_terms,
                         self.train_only_positives, self.train_only_negatives, self.weak_terms)


def data_hash(positives: Mapping[str, Sequence[str]], negatives: Sequence[str],
              terms: Mapping[str, Sequence[str]] | None = None, contrast_terms: Sequence[str] = (),
              train_only_positives: Mapping[str, Sequence[str]] | None = None,
              train_only_negatives: Sequence[str] = (), weak_terms: Mapping[str, Sequence[str]] | None = None) -> str:
    """SHA-256 of the training prompts and topic terms (topic order and prompt order included).

    Example:
        >>> data_hash({"a": ["x"]}, ["y"]) == data_hash({"a": ["x"]}, ["y"])
        True
    """
    data: dict[str, Any] = {"positives": {t: list(p) for t, p in positives.items()}, "negatives": list(negatives)}
    if any(terms.values() if terms else ()):
        data["terms"] = {t: list(v) for t, v in terms.items()}
    if contrast_terms:
        data["contrast_terms"] = list(contrast_terms)
    if any((train_only_positives or {}).values()) or train_only_negatives:  # absent: older hashes still match
        data["train_only"] = {"positives": {t: list(p) for t, p in (train_only_positives or {}).items()},
                              "negatives": list(train_only_negatives)}
    if any((weak_terms or {}).values()):
        data["weak_terms"] = {t: list(v) for t, v in (weak_terms or {}).items()}
    blob = json.dumps(data, ensure_ascii=False, sort_keys=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def suggest_terms(positives: Mapping[str, Sequence[str]], negatives: Sequence[str],
                  terms: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[tuple[str, int]]]:
    """Per topic, capitalised names in its prompts that could become terms, most frequent first.

    A candidate is not matched by the topic's terms already, occurs in no negative and no
    other topic's prompts, and (if one word) is not an English word ("Force", "Empire").
    Review them: a name can still be an ordinary phrase ("A New Hope").

    Example:
        >>> suggest_terms({"sw": ["Rides at Galaxy's Edge?", "Is Galaxy's Edge fun?", "Who is Yoda?"]},
        ...               ["Trip to London"], {"sw": ["Yoda"]})
        {'sw': [("Galaxy's Edge", 2)]}
    """
    from collections import Counter

    from eco_guard.classifier.augment import entity_prompts
    from eco_guard.classifier.lexicon import TermMatcher, english_words, term_pattern
    from eco_guard.classifier.normalize import normalize_text

    def names(text: str) -> list[str]:  # "Rey's" counts as "Rey"; "Mc" (cut from "McGonagall") is no name
        bare = (re.sub(r"['’]s?$", "", n) for n in entity_prompts(text))
        return list(dict.fromkeys(n for n in bare if len(n.split()[-1]) > 2))

    found = {t: Counter(n for text in texts for n in names(text)) for t, texts in positives.items()}
    normalized = {t: "\n".join(normalize_text(p) for p in texts) for t, texts in positives.items()}
    negative_text = "\n".join(normalize_text(p) for p in negatives)
    out: dict[str, list[tuple[str, int]]] = {}
    for topic, counts in found.items():
        others_text = "\n".join([negative_text, *(v for t, v in normalized.items() if t != topic)])
        covered = TermMatcher(list((terms or {}).get(topic, ())))
        out[topic] = [(name, n) for name, n in counts.most_common()
                      if not covered.find(norm := normalize_text(name), name)
                      and not (" " not in norm and norm in english_words())
                      and not term_pattern([name]).search(others_text)]  # type: ignore[union-attr]
    return out
