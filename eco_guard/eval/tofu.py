"""TOFU's unlearning metrics (Maini et al., 2024), for models that may see corrupted prompts.

Pure functions first (lists and tensors in, numbers out), then model-level helpers that
score or generate answers through the chat template, optionally with the prompt's
embeddings corrupted (ECO without the classifier). Definitions follow TOFU's paper and its
``aggregate_eval_stat.py``:

- ROUGE-L recall: longest common subsequence of words / words in the reference.
- Answer probability: ``exp(-mean token NLL)`` of the answer given the question (the
  per-token, length-normalised likelihood); on general questions it is normalised over
  the true and the perturbed answers, ``p_true / (p_true + sum p_perturbed)``.
- Truth ratio: ``R = (prod_i p(perturbed_i)^(1/|perturbed_i|))^(1/k) / p(paraphrase)^(1/|paraphrase|)``,
  i.e. ``exp(nll_paraphrase - mean_i nll_perturbed_i)`` with per-token NLLs.
  Utility uses ``mean(max(0, 1 - R))``; TOFU's forget-set summary uses ``mean(min(R, 1/R))``.
- Forget quality: the p-value of a two-sample KS test between the truth ratios of a
  method and of the retain model on the forget set.
- Model utility: the harmonic mean of the non-forget scores.
- Hit rate: share of replies that contain every short answer key.

Example:
    >>> rouge_l_recall("born in Bergen, Norway", "She was born in Bergen")
    0.6
    >>> round(float(truth_ratio(torch.tensor([1.0]), torch.tensor([[2.0, 2.0, 2.0]]))[0]), 4)
    0.3679
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import torch
from scipy.stats import ks_2samp

__all__ = [
    "ChatPrompt",
    "AnswerCorruptor",
    "PromptCorruptor",
    "QALike",
    "answer_nlls",
    "answer_probability",
    "chat_prompt",
    "forget_quality",
    "forget_truth_ratio_stat",
    "generate_answers",
    "harmonic_mean",
    "hit",
    "hit_rate",
    "lcs_length",
    "normalised_answer_probability",
    "option_nlls",
    "prompt_seed",
    "rouge_l_recall",
    "truth_ratio",
    "truth_ratio_score",
]

_WORD: Final = re.compile(r"\w+")
DEFAULT_BATCH: Final = 16
DEFAULT_MAX_NEW_TOKENS: Final = 40


# --------------------------------------------------------------------- pure metrics

def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence (one-row dynamic programme)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j-1] of the previous row
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall: LCS of lower-cased words over the reference's length (no stemming).

    TOFU uses ``rouge_score`` with a Porter stemmer; we skip the stemmer, which only
    makes us slightly stricter on inflections.
    """
    ref = _words(reference)
    return lcs_length(_words(prediction), ref) / len(ref) if ref else 0.0


def _key_pattern(key: str) -> re.Pattern[str]:
    # Plain substring match, except that a number may not sit inside a longer number
    # ("0" is not in "10"); words may still inflect ("thriller" is in "thrillers").
    before = r"(?<!\d)" if key[:1].isdigit() else ""
    after = r"(?!\d)" if key[-1:].isdigit() else ""
    return re.compile(before + re.escape(key.lower()) + after)


def hit(reply: str, keys: Sequence[str]) -> bool:
    """Whether the reply contains every key (case-insensitive; numbers match whole)."""
    lowered = reply.lower()
    return all(_key_pattern(key).search(lowered) for key in keys)


def hit_rate(replies: Sequence[str], keys: Sequence[Sequence[str]]) -> float:
    """Share of replies that contain all their keys."""
    if len(replies) != len(keys):
        raise ValueError(f"{len(replies)} replies but {len(keys)} key lists")
    return sum(map(hit, replies, keys)) / len(replies) if replies else 0.0


def answer_probability(nll: torch.Tensor) -> float:
    """Mean per-token answer probability, ``mean(exp(-nll))`` (TOFU's Prob. on retain)."""
    return float(torch.exp(-nll).mean())


def normalised_answer_probability(true_nll: torch.Tensor, perturbed_nll: torch.Tensor) -> float:
    """``mean(p_true / (p_true + sum_i p_perturbed_i))`` with per-token probabilities.

    Args:
        true_nll: ``(n,)`` per-token NLLs of the true answers.
        perturbed_nll: ``(n, k)`` per-token NLLs of the wrong answers.
    """
    p_true = torch.exp(-true_nll)
    return float((p_true / (p_true + torch.exp(-perturbed_nll).sum(-1))).mean())


def truth_ratio(paraphrased_nll: torch.Tensor, perturbed_nll: torch.Tensor) -> torch.Tensor:
    """TOFU's truth ratio per question: perturbed over paraphrased, length-normalised.

    Args:
        paraphrased_nll: ``(n,)`` per-token NLLs of the paraphrased (true) answers.
        perturbed_nll: ``(n, k)`` per-token NLLs of the perturbed (wrong) answers.

    Returns:
        ``(n,)`` ratios; below 1 means the model prefers the truth.
    """
    return torch.exp(paraphrased_nll - perturbed_nll.mean(-1))


def truth_ratio_score(ratios: torch.Tensor) -> float:
    """Utility's truth-ratio score, ``mean(max(0, 1 - R))``: 1 = always prefers the truth."""
    return float(torch.clamp(1 - ratios, min=0).mean())


def forget_truth_ratio_stat(ratios: torch.Tensor) -> float:
    """TOFU's forget-set summary ``mean(min(R, 1/R))``: 1 = no preference either way."""
    return float(torch.minimum(ratios, 1 / ratios).mean())


def forget_quality(method_ratios: Sequence[float] | torch.Tensor,
                   retain_ratios: Sequence[float] | torch.Tensor) -> float:
    """KS-test p-value between two truth-ratio samples; high = indistinguishable from retain."""
    return float(ks_2samp(_to_list(method_ratios), _to_list(retain_ratios)).pvalue)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (a model that fails one part has no utility)."""
    if not values:
        raise ValueError("harmonic mean of no values")
    if min(values) <= 0:
        return 0.0
    return len(values) / sum(1 / v for v in values)


def _to_list(values: Sequence[float] | torch.Tensor) -> list[float]:
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


# --------------------------------------------------------------------- model helpers

class QALike(Protocol):
    """What the helpers read from a QA item."""

    question: str
    answer: str
    paraphrase: str
    perturbed: Sequence[str]


@dataclass(frozen=True)
class ChatPrompt:
    """A question rendered by the chat template: text, token ids and character offsets."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]


PromptCorruptor = Callable[[torch.Tensor, ChatPrompt, Any], torch.Tensor]
"""``(prompt_embeds (1, seq, dim), prompt, item) -> corrupted copy``: what a deployed ECO
guard does (it corrupts the prefill, never the answer)."""

AnswerCorruptor = Callable[[torch.Tensor, str, list[tuple[int, int]], Any], torch.Tensor]
"""``(answer_embeds (1, len, dim), answer text, its token offsets, item) -> corrupted copy``.
For teacher-forced scoring only: the ECO paper's code scores answers with its token
classifier run over prompt + answer, so entity tokens *inside the scored answer* (an
author's name repeated in it) are corrupted too. A guard never does this at inference."""


def chat_prompt(tokenizer: Any, question: str) -> ChatPrompt:
    """Render a user question as the model's chat template does, ready for the answer."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return ChatPrompt(text, list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]])


def prompt_seed(text: str, base_seed: int = 0) -> int:
    """A stable seed per prompt, so the same prompt always gets the same noise."""
    digest = hashlib.sha256(f"{base_seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _prompt_embeds(model: Any, prompt: ChatPrompt, item: Any, corrupt: PromptCorruptor | None) -> torch.Tensor:
    embeds = model.get_input_embeddings()(torch.tensor([prompt.ids]))
    return corrupt(embeds, prompt, item) if corrupt is not None else embeds


def _answer_inputs(model: Any, tokenizer: Any, item: Any, options: Sequence[str],
                   corrupt_answer: AnswerCorruptor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-padded option ids, their scored mask, and (when corrupting) their embeddings."""
    texts = [o + tokenizer.eos_token for o in options]
    encoded = [tokenizer(t, add_special_tokens=False, return_offsets_mapping=True) for t in texts]
    width = max(len(e["input_ids"]) for e in encoded)
    ids = torch.full((len(options), width), tokenizer.pad_token_id)
    scored = torch.zeros((len(options), width), dtype=torch.bool)
    for row, e in enumerate(encoded):
        n = len(e["input_ids"])
        ids[row, :n], scored[row, :n] = torch.tensor(e["input_ids"]), True
    if corrupt_answer is None:
        return ids, scored, None
    embeds = model.get_input_embeddings()(ids)
    rows = []
    for row, (text, e) in enumerate(zip(texts, encoded)):
        n = len(e["input_ids"])
        head = corrupt_answer(embeds[row: row + 1, :n], text, [tuple(o) for o in e["offset_mapping"]], item)
        rows.append(torch.cat([head, embeds[row: row + 1, n:]], dim=1))
    return ids, scored, torch.cat(rows)


@torch.no_grad()
def option_nlls(model: Any, tokenizer: Any, item: Any, options: Sequence[str],
                corrupt: PromptCorruptor | None = None, corrupt_answer: AnswerCorruptor | None = None) -> torch.Tensor:
    """Per-token NLL of each option as the answer to ``item.question``.

    The (possibly corrupted) prompt runs once; its key/value cache is shared by all
    options, which are scored in one batch. The answer's end-of-turn token is scored too,
    as in training. ``corrupt_answer`` also corrupts the options' own tokens (the ECO
    paper's scoring convention; see :data:`AnswerCorruptor`).

    Returns:
        ``(len(options),)`` mean NLL per answer token.
    """
    prompt = chat_prompt(tokenizer, item.question)
    out = model(inputs_embeds=_prompt_embeds(model, prompt, item, corrupt), use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(options))
    ids, scored, embeds = _answer_inputs(model, tokenizer, item, options, corrupt_answer)
    attention = torch.cat([torch.ones((len(options), len(prompt.ids)), dtype=torch.long), scored.long()], dim=1)
    inputs = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
    logits = model(**inputs, attention_mask=attention, cache=cache).logits
    # The first answer token is predicted by the prompt's last position.
    logits = torch.cat([out.logits[:, -1:].expand(len(options), -1, -1), logits[:, :-1]], dim=1)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), ids, reduction="none")
    return (nll * scored).sum(1) / scored.sum(1)


def answer_nlls(model: Any, tokenizer: Any, items: Sequence[QALike], corrupt: PromptCorruptor | None = None,
                corrupt_answer: AnswerCorruptor | None = None) -> dict[str, torch.Tensor]:
    """Per-token NLLs of each item's answer, paraphrase and perturbed answers.

    Returns:
        ``{"answer": (n,), "paraphrase": (n,), "perturbed": (n, k)}``.
    """
    rows = [option_nlls(model, tokenizer, item, [item.answer, item.paraphrase, *item.perturbed], corrupt,
                        corrupt_answer) for item in items]
    stacked = torch.stack(rows)
    return {"answer": stacked[:, 0], "paraphrase": stacked[:, 1], "perturbed": stacked[:, 2:]}


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, items: Sequence[QALike], corrupt: PromptCorruptor | None = None,
                     max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = DEFAULT_BATCH) -> list[str]:
    """Greedy replies to each item's question, from (possibly corrupted) prompt embeddings.

    Prompts are left-padded into batches; generation starts from ``inputs_embeds`` so the
    corruption touches the prefill only.
    """
    replies: list[str] = []
    embed = model.get_input_embeddings()
    for start in range(0, len(items), batch_size):
        chunk = items[start: start + batch_size]
        prompts = [chat_prompt(tokenizer, item.question) for item in chunk]
        width = max(len(p.ids) for p in prompts)
        pad = embed(torch.tensor([tokenizer.pad_token_id]))[0]
        rows, masks = [], []
        for prompt, item in zip(prompts, chunk):
            embeds = _prompt_embeds(model, prompt, item, corrupt)[0]
            n_pad = width - len(prompt.ids)
            rows.append(torch.cat([pad.expand(n_pad, -1), embeds]))
            masks.append(torch.tensor([0] * n_pad + [1] * len(prompt.ids)))
        output = model.generate(inputs_embeds=torch.stack(rows), attention_mask=torch.stack(masks),
                                max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        replies.extend(tokenizer.batch_decode(output, skip_special_tokens=True))
    return [reply.strip() for reply in replies]
