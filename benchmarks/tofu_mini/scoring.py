"""Score one model (optionally with ECO's corrupted prompts) on the tofu_mini splits.

``measure`` does the expensive part (per-item NLLs of answer, paraphrase and perturbed
answers, and greedy replies) and returns plain lists, cached as JSON by ``run.py``;
``summarise`` turns those into TOFU's numbers, against the retain model's measurements.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture import QAItem, load_authors, load_qa  # noqa: E402

from eco_guard.corruption import CorruptionSpec  # noqa: E402
from eco_guard.eval import tofu  # noqa: E402
from eco_guard.selection import keyword_spans, token_mask  # noqa: E402

# Every third retain author (9 of 27) for the likelihood metrics: TOFU also scores a
# retain subset, and scoring 5 answers per question is the benchmark's main cost.
RETAIN_EVAL_STRIDE: Final = 3
MAX_NEW_TOKENS: Final = 32  # answer sentences are at most ~25 tokens


def eval_items() -> dict[str, list[QAItem]]:
    """The items scored per split: all forget and general items, a retain subset."""
    retain_authors = [a["name"] for a in load_authors() if a["split"] == "retain"][::RETAIN_EVAL_STRIDE]
    return {"forget": load_qa(["forget"]),
            "retain": [i for i in load_qa(["retain"]) if i.author in retain_authors],
            "general": load_qa(["general"])}


def measure(model: Any, tokenizer: Any, items: Sequence[QAItem], corrupt: tofu.PromptCorruptor | None = None,
            desc: str = "", corrupt_answer: tofu.AnswerCorruptor | None = None,
            generate: bool = True) -> dict[str, list]:
    """Per-item NLLs and (unless ``generate`` is false) greedy replies, JSON-ready.

    Returns:
        ``{"answer": [n], "paraphrase": [n], "perturbed": [n][k], "replies": [n]}``.
    """
    nlls = [tofu.option_nlls(model, tokenizer, item, [item.answer, item.paraphrase, *item.perturbed], corrupt,
                             corrupt_answer)
            for item in tqdm(items, desc=f"{desc} scoring", leave=False)]
    stacked = torch.stack(nlls)
    out = {"answer": stacked[:, 0].tolist(), "paraphrase": stacked[:, 1].tolist(),
           "perturbed": stacked[:, 2:].tolist()}
    if generate:
        out["replies"] = tofu.generate_answers(model, tokenizer, items, corrupt, max_new_tokens=MAX_NEW_TOKENS)
    return out


def _ratios(raw: dict[str, list]) -> torch.Tensor:
    return tofu.truth_ratio(torch.tensor(raw["paraphrase"]), torch.tensor(raw["perturbed"]))


def split_scores(raw: dict[str, list], items: Sequence[QAItem], split: str) -> dict[str, float]:
    """TOFU's per-split numbers: probability, ROUGE-L recall, truth-ratio score, hit rate."""
    answer = torch.tensor(raw["answer"])
    prob = (tofu.normalised_answer_probability(answer, torch.tensor(raw["perturbed"])) if split == "general"
            else tofu.answer_probability(answer))
    ratios = _ratios(raw)
    return {
        "prob": prob,
        "rouge_l": sum(map(tofu.rouge_l_recall, raw["replies"], [i.answer for i in items])) / len(items),
        "truth_ratio": (tofu.forget_truth_ratio_stat(ratios) if split == "forget" else tofu.truth_ratio_score(ratios)),
        "hit_rate": tofu.hit_rate(raw["replies"], [i.keys for i in items]),
    }


def summarise(raw: dict[str, dict[str, list]], retain_forget_raw: dict[str, list],
              items: dict[str, list[QAItem]]) -> dict[str, Any]:
    """Forget quality, model utility and the forget-set numbers of one method.

    Args:
        raw: the method's measurements per split.
        retain_forget_raw: the retain model's measurements on the forget split.
        items: the scored items per split.
    """
    per_split = {split: split_scores(raw[split], items[split], split) for split in items}
    utility_parts = [per_split[s][m] for s in ("retain", "general") for m in ("prob", "rouge_l", "truth_ratio")]
    return {
        "forget_quality": tofu.forget_quality(_ratios(raw["forget"]), _ratios(retain_forget_raw)),
        "model_utility": tofu.harmonic_mean(utility_parts),
        "forget_rouge_l": per_split["forget"]["rouge_l"],
        "forget_hit_rate": per_split["forget"]["hit_rate"],
        "forget_replies": list(raw["forget"]["replies"]),
        "splits": per_split,
    }


def reply_nlls(model: Any, tokenizer: Any, items: Sequence[QAItem], replies: Sequence[str]) -> list[float]:
    """Per-token NLL of each reply as the answer to its (uncorrupted) question: how likely the text is to
    the model, whoever wrote it."""
    return [float(tofu.option_nlls(model, tokenizer, item, [reply or " "])[0]) for item, reply in zip(items, replies)]


# --- ECO without the classifier: corrupt the author's name in the prompt -------------------

def question_span(prompt: tofu.ChatPrompt, question: str) -> tuple[int, int]:
    """Character span of the user's question inside the rendered chat prompt."""
    at = prompt.text.rfind(question)
    if at < 0:
        raise ValueError(f"question {question!r} not found in its rendered prompt")
    return at, at + len(question)


def keyword_corruptor(spec: CorruptionSpec, keywords: Sequence[str]) -> tofu.PromptCorruptor:
    """A corruptor for ``tofu`` helpers: ``spec`` on the question's keyword tokens only.

    The noise is seeded by the rendered prompt (as the guard seeds it by the prompt), so a
    question gets the same corruption whichever answer is being scored.
    """
    def corrupt(embeds: torch.Tensor, prompt: tofu.ChatPrompt, item: QAItem) -> torch.Tensor:
        spans = keyword_spans(prompt.text, keywords, [question_span(prompt, item.question)])
        mask = torch.tensor([token_mask(prompt.offsets, spans)])
        return spec.apply(embeds, mask, keys=[prompt.text])

    return corrupt


ECO_CONFIG: Final = Path(__file__).resolve().parent / "eco.yaml"
LEARNED_CONFIG: Final = Path(__file__).resolve().parent / "eco_learned.yaml"


def keyword_answer_corruptor(spec: CorruptionSpec, keywords: Sequence[str]) -> tofu.AnswerCorruptor:
    """``spec`` on the keyword tokens inside a scored answer (the ECO paper's scoring)."""
    def corrupt(embeds: torch.Tensor, text: str, offsets: list[tuple[int, int]], item: QAItem) -> torch.Tensor:
        spans = keyword_spans(text, keywords, [(0, len(text))])
        if not spans:
            return embeds
        return spec.apply(embeds, torch.tensor([token_mask(offsets, spans)]), keys=[text])

    return corrupt


def forget_keywords(config: Path = ECO_CONFIG) -> list[str]:
    """The keywords ``eco.yaml`` corrupts (names and titles of the forget authors)."""
    from eco_guard.config import load_config

    return list(load_config(config).topics[0].selection.keywords)


def eco_spec(strength: float, config: Path = ECO_CONFIG) -> CorruptionSpec:
    """``eco.yaml``'s corruption at another strength."""
    from eco_guard.config import load_config

    return load_config(config).topics[0].corruption.with_strength(strength)


# --- ECO through the guard: its classifier routes, its selection and corruption apply -------

def guard_corruptor(guard: Any, decisions: dict[str, dict] | None = None) -> tofu.PromptCorruptor:
    """A corruptor that asks ``guard`` what it would do with each question.

    Unflagged questions pass unchanged (the fallback is the same model, uncorrupted);
    flagged ones get the guard's own mask, spec and seed key. Each decision is recorded in
    ``decisions`` (question -> decision dict) when given.
    """
    def corrupt(embeds: torch.Tensor, prompt: tofu.ChatPrompt, item: QAItem) -> torch.Tensor:
        answer = guard.plan(item.question)
        if decisions is not None:
            decisions[item.question] = answer.decision.to_dict()
        plan = answer.corruption
        if plan is None or not plan.n_tokens:
            return embeds
        if list(answer.prompt.input_ids) != prompt.ids:
            raise ValueError("the guard renders the question differently from the benchmark's chat prompt")
        mask = torch.tensor([list(plan.mask)])
        return plan.spec.apply(embeds, mask, keys=[plan.key])

    return corrupt


def guard_answer_corruptor(guard: Any, decisions: dict[str, dict]) -> tofu.AnswerCorruptor:
    """The paper's scoring under the guard's routing: the flagged topic's keywords inside a
    scored answer get that topic's corruption; answers to unflagged questions are untouched.

    Reads the decision ``guard_corruptor`` recorded for the question (the prompt is
    corrupted, hence routed, before the answers are scored).
    """
    per_topic = {t.name: keyword_answer_corruptor(guard.corruption_of(t.name)[0], list(t.selection.keywords))
                 for t in guard.config.topics}

    def corrupt(embeds: torch.Tensor, text: str, offsets: list[tuple[int, int]], item: QAItem) -> torch.Tensor:
        decision = decisions[item.question]
        if not decision["flagged"] or decision["topic"] not in per_topic:
            return embeds
        return per_topic[decision["topic"]](embeds, text, offsets, item)

    return corrupt


def heldout_routing(guard: Any, rows: Sequence[dict]) -> dict[str, Any]:
    """Share of held-out classifier prompts (``data/prompts.jsonl``, fold ``test``) the
    guard's classifier flags, per split and per split × form; the misrouted texts."""
    verdicts = guard.screen([r["text"] for r in rows])
    if failed := next((v.error for v in verdicts if v.error), None):
        raise RuntimeError(f"classifier failed: {failed}")
    groups: dict[str, list[bool]] = {}
    for row, verdict in zip(rows, verdicts):
        for key in (row["split"], f"{row['split']}/{row['form']}"):
            groups.setdefault(key, []).append(verdict.flagged)
    wrong = [{"text": r["text"], "split": r["split"], "form": r["form"], "score": round(v.score, 4)}
             for r, v in zip(rows, verdicts) if v.flagged != bool(r["label"])]
    return {"flagged_rate": {k: sum(v) / len(v) for k, v in sorted(groups.items())},
            "n": {k: len(v) for k, v in sorted(groups.items())}, "misrouted": wrong}
