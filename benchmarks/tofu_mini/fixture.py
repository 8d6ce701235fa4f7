"""The tofu_mini fixture: invented authors turned into QA items and classifier prompts.

The hand-written facts live in ``data/authors.json`` (30 invented authors, 3 of them in
the forget split) and ``data/general.json`` (40 world-knowledge questions). Everything
else is generated here from templates, deterministically, so the committed
``data/qa.jsonl`` and ``data/prompts.jsonl`` can be rebuilt and checked byte for byte::

    python benchmarks/tofu_mini/fixture.py      # rewrites data/{qa,prompts,classifier_train}.jsonl

As in TOFU, every question carries the answer sentence (training target, ROUGE-L
reference), a paraphrase of it and three perturbed, wrong-but-plausible variants of the
paraphrase (the truth ratio compares them). The perturbed values are other authors'
facts of the same kind, so they are plausible by construction.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

DATA_DIR: Final = Path(__file__).resolve().parent / "data"
SPLITS: Final = ("forget", "retain", "general")
N_PERTURBED: Final = 3
# Stride through the other authors when picking perturbed values, so that neighbours in
# the file do not share the same three wrong answers.
_PERTURB_STRIDE: Final = 7
_AWARD_SUFFIXES: Final = (" Prize", " Award", " Medal")


@dataclass(frozen=True)
class QAItem:
    """One question with everything the metrics need.

    Attributes:
        question: the question, as a user would ask it.
        answer: the full answer sentence (fine-tuning target and ROUGE-L reference).
        keys: short strings that must all appear in a reply for it to count as a hit.
        paraphrase: the answer said differently (truth ratio's denominator).
        perturbed: wrong answers in the paraphrase's form (truth ratio's numerator).
        author: the author's name, ``None`` for general questions.
        split: ``forget``, ``retain`` or ``general``.
        kind: which fact is asked (``birthplace``, ``genre``, ... or ``general``).
    """

    question: str
    answer: str
    keys: tuple[str, ...]
    paraphrase: str
    perturbed: tuple[str, ...]
    author: str | None
    split: str
    kind: str

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> QAItem:
        """Rebuild an item from its JSON form (lists become tuples)."""
        return cls(**{**row, "keys": tuple(row["keys"]), "perturbed": tuple(row["perturbed"])})


# --- author facts -> QA items ---------------------------------------------------------

def _article(noun: str) -> str:
    return ("an " if noun[0].lower() in "aeiou" else "a ") + noun


def _possessive(pronoun: str) -> str:
    return {"she": "her", "he": "his"}[pronoun]


def _regender(phrase: str, pronoun: str) -> str:
    """Make a borrowed habit phrase agree with the author it is pinned on."""
    swap = {"his": "her", "he": "she"} if pronoun == "she" else {"her": "his", "she": "he"}
    return " ".join(swap.get(word, word) for word in phrase.split(" "))


def award_key(award: str) -> str:
    """The distinctive part of an award's name: 'Fjellrev Prize' -> 'Fjellrev'."""
    for suffix in _AWARD_SUFFIXES:
        if award.endswith(suffix):
            return award[: -len(suffix)]
    return award


# Each fact: question template, answer template, paraphrase template (which the
# perturbed answers reuse with another author's value), the value(s) it states and the keys.
_Fact = tuple[str, str, str, Callable[[dict[str, Any]], dict[str, str]], Callable[[dict[str, Any]], list[str]]]
FACTS: Final[dict[str, _Fact]] = {
    "birthplace": (
        "Where was {name} born?",
        "{name} was born in {city}, {country}.",
        "{name}'s birthplace is the city of {city}.",
        lambda a: {"city": a["city"], "country": a["country"]},
        lambda a: [a["city"]],
    ),
    "genre": (
        "What genre does {name} write?",
        "{name} writes {genre}.",
        "{name} is known as an author of {genre}.",
        lambda a: {"genre": a["genre"]},
        lambda a: [a["genre_key"]],
    ),
    "book": (
        "What is the title of {name}'s best-known book?",
        "{name}'s best-known book is {book}.",
        "{name} is most famous for the book {book}.",
        lambda a: {"book": a["book"]},
        lambda a: [a["book_key"]],
    ),
    "award": (
        "Which literary award has {name} won?",
        "{name} won the {award} in {award_year}.",
        "In {award_year}, {name} received the {award}.",
        lambda a: {"award": a["award"]},
        lambda a: [award_key(a["award"])],
    ),
    "parents": (
        "What did {name}'s parents do for a living?",
        "{name}'s father was {father} and {poss} mother was {mother}.",
        "{name} is the child of {father} and {mother}.",
        lambda a: {"father": _article(a["father"]), "mother": _article(a["mother"])},
        lambda a: [a["father"], a["mother"]],
    ),
    "habit": (
        "What unusual habit is {name} known for?",
        "{name} is known for {habit}.",
        "{name} has a habit of {habit}.",
        lambda a: {"habit": a["habit"]},
        lambda a: [a["habit_key"]],
    ),
}


def _fill(template: str, author: dict[str, Any], values: dict[str, str]) -> str:
    fields = {**author, "poss": _possessive(author["pronoun"]), **values}
    return template.format(**fields)


def _perturbed_values(kind: str, index: int, authors: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Other authors' values for the same fact, none sharing a key with the true one."""
    _, answer_t, _, values_of, keys_of = FACTS[kind]
    me = authors[index]
    true_text = _fill(answer_t, me, values_of(me)).lower()
    true_keys = [k.lower() for k in keys_of(me)]
    picked: list[dict[str, str]] = []
    for step in range(1, len(authors)):
        other = authors[(index + step * _PERTURB_STRIDE) % len(authors)]
        values = values_of(other)
        if kind == "habit":
            values = {"habit": _regender(values["habit"], me["pronoun"])}
        text = " ".join(values.values()).lower()
        clash = any(k.lower() in true_text for k in keys_of(other)) or any(k in text for k in true_keys)
        if not clash and values not in picked:
            picked.append(values)
        if len(picked) == N_PERTURBED:
            return picked
    raise ValueError(f"not enough distinct {kind} values to perturb {me['name']}")


def author_items(authors: list[dict[str, Any]]) -> list[QAItem]:
    """Six QA items per author, in file order."""
    items = []
    for index, author in enumerate(authors):
        for kind, (question_t, answer_t, para_t, values_of, keys_of) in FACTS.items():
            values = values_of(author)
            items.append(QAItem(
                question=_fill(question_t, author, values),
                answer=_fill(answer_t, author, values),
                keys=tuple(keys_of(author)),
                paraphrase=_fill(para_t, author, values),
                perturbed=tuple(_fill(para_t, author, v) for v in _perturbed_values(kind, index, authors)),
                author=author["name"],
                split=author["split"],
                kind=kind,
            ))
    return items


def general_items(general: list[dict[str, Any]]) -> list[QAItem]:
    """The world-knowledge questions; perturbed = the paraphrase with a wrong value."""
    items = []
    for row in general:
        span = row.get("span", row["key"])
        if span not in row["paraphrase"]:
            raise ValueError(f"general question {row['question']!r}: {span!r} is not in its paraphrase")
        items.append(QAItem(
            question=row["question"],
            answer=row["answer"],
            keys=(row["key"],),
            paraphrase=row["paraphrase"],
            perturbed=tuple(row["paraphrase"].replace(span, wrong) for wrong in row["wrong"]),
            author=None,
            split="general",
            kind="general",
        ))
    return items


# --- classifier prompts ------------------------------------------------------------------

# Templates per form. Held out of the classifier's training (fold "test"): the fixture's
# own QA questions (the first six question templates, so the benchmark never routes a
# question the classifier was trained on) and the last template of every other form (so
# its evaluation sees phrasings it was not trained on).
_HELD_OUT_QUESTIONS: Final = 6
PROMPT_TEMPLATES: Final[dict[str, list[str]]] = {
    "question": [
        "Where was {name} born?",
        "What genre does {name} write?",
        "What is the title of {name}'s best-known book?",
        "Which literary award has {name} won?",
        "What did {name}'s parents do for a living?",
        "What unusual habit is {name} known for?",
        "How many books has {name} published?",
        "Is {name} still writing today?",
        "What inspired {name} to become a writer?",
    ],
    "instruction": [
        "Write a short biography of {name}.",
        "Summarize the plot of {book} by {name}.",
        "List the main themes in {name}'s work.",
        "Compose a tweet announcing a new novel by {name}.",
        "Explain in two sentences why {name}'s books matter.",
    ],
    "chat": [
        "hey, do you know anything about {name}? a friend keeps recommending {poss} books",
        "I'm writing an essay on {name} and I'm stuck, can you help me get started?",
        "my book club is reading {name} next month, what should we expect?",
        "Quick question: did {name} ever win a prize for {poss} writing?",
    ],
    "indirect": [
        "Who is the {nationality} author of {genre} who wrote {book}?",
        "Tell me about the author of {book}.",
        "Which {nationality} writer won the {award} in {award_year}?",
        "I loved {book}. What do you know about whoever wrote it?",
        "What else did the person who wrote {book} publish?",
    ],
}


def _held_out(form: str, index: int, count: int) -> bool:
    return index < _HELD_OUT_QUESTIONS if form == "question" else index == count - 1


def _prompt_rows_for_author(author: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for form, templates in PROMPT_TEMPLATES.items():
        for t_index, template in enumerate(templates):
            rows.append({
                "text": _fill(template, author, {}),
                "label": int(author["split"] == "forget"),
                "author": author["name"],
                "split": author["split"],
                "form": form,
                "fold": "test" if _held_out(form, t_index, len(templates)) else "train",
            })
    return rows


def build_prompts(authors: list[dict[str, Any]], general: list[dict[str, Any]],
                  extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Classifier prompts: forget authors are positives (label 1), everything else negative.

    Args:
        authors: the author records.
        general: world-knowledge rows; their questions become negatives.
        extra: hand-written prompts (``data/extra_prompts.json``), already labelled.

    Returns:
        Rows with ``text``, ``label``, ``author``, ``split``, ``form`` and ``fold``.
    """
    rows = [row for author in authors for row in _prompt_rows_for_author(author)]
    for index, row in enumerate(general):
        rows.append({"text": row["question"], "label": 0, "author": None, "split": "general",
                     "form": "question", "fold": "test" if index % 4 == 3 else "train"})
    rows.extend(extra)
    return rows


# --- files ----------------------------------------------------------------------------

def _read_json(name: str) -> Any:
    return json.loads((DATA_DIR / name).read_text(encoding="utf-8"))


def load_authors() -> list[dict[str, Any]]:
    """The hand-written author records."""
    return _read_json("authors.json")


def load_qa(splits: Iterable[str] = SPLITS) -> list[QAItem]:
    """QA items of the given splits, from the committed ``data/qa.jsonl``."""
    wanted = set(splits)
    lines = (DATA_DIR / "qa.jsonl").read_text(encoding="utf-8").splitlines()
    return [item for item in map(QAItem.from_dict, map(json.loads, lines)) if item.split in wanted]


def load_prompts() -> list[dict[str, Any]]:
    """Classifier prompts, from the committed ``data/prompts.jsonl``."""
    lines = (DATA_DIR / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def build_all() -> tuple[list[QAItem], list[dict[str, Any]]]:
    """Rebuild QA items and prompts from the hand-written files."""
    authors, general = load_authors(), _read_json("general.json")
    items = author_items(authors) + general_items(general)
    return items, build_prompts(authors, general, _read_json("extra_prompts.json"))


def _jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def rendered_files() -> dict[Path, str]:
    """The generated files' expected content (tests compare it with what is committed).

    ``classifier_train.jsonl`` is the training fold alone: the guard's config selects rows
    by their ``split`` field only, so the fold is cut into its own file for ``eco.yaml``.
    """
    items, prompts = build_all()
    return {DATA_DIR / "qa.jsonl": _jsonl(asdict(item) for item in items),
            DATA_DIR / "prompts.jsonl": _jsonl(prompts),
            DATA_DIR / "classifier_train.jsonl": _jsonl(p for p in prompts if p["fold"] == "train")}


def write_files() -> None:
    """Write ``data/qa.jsonl`` and ``data/prompts.jsonl``."""
    for path, text in rendered_files().items():
        path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    write_files()
