"""Teach SmolLM2-135M-Instruct the invented authors, then unlearn them by gradient methods.

Four models, each saved as a plain Hugging Face folder (``save_pretrained`` + tokenizer)
under ``benchmarks/tofu_mini/cache/<name>/`` and skipped when already there:

- ``full``: fine-tuned on every author (the model that must forget);
- ``retain``: fine-tuned on the retain authors only (never saw the forget set; the
  reference that forget quality is measured against);
- ``grad_ascent``: ``full`` after gradient ascent on the forget set;
- ``grad_diff``: ``full`` after gradient difference (ascent on forget, descent on retain).

Why a full fine-tune rather than LoRA: at 135M parameters the full model and its AdamW
state take about 2 GB, one step costs about the same as with LoRA on CPU (the forward and
backward passes dominate), and facts are memorised in fewer epochs when every weight can
move, which is what makes the fixture cheap. The saved folders then load like any model.

Usage::

    python benchmarks/tofu_mini/finetune.py            # all four, cached
    python benchmarks/tofu_mini/finetune.py full retain
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture import QAItem, load_qa  # noqa: E402

CACHE_DIR: Final = Path(__file__).resolve().parent / "cache"
INFO_FILE: Final = "train_info.json"
IGNORE_INDEX: Final = -100
# One thread: the 2 cores are shared with the rest of the team, and two threads competing
# with other jobs ran 4x slower than one (OpenMP threads spin waiting for each other).
NUM_THREADS: Final = 1
logger = logging.getLogger("tofu_mini.finetune")


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning settings (AdamW, batch 8, constant lr after a short warm-up)."""

    lr: float = 2e-4  # twice the measured 1e-4: fewer epochs on a crowded CPU
    batch_size: int = 8
    max_epochs: int = 8
    min_epochs: int = 3
    warmup_steps: int = 5
    # Stop once this share of the training answers was reproduced token for token under
    # teacher forcing (argmax) during the epoch; greedy decoding then reproduces them too.
    # Measured on the training batches themselves (before each step), so it costs nothing
    # and lags slightly behind the model.
    stop_exact: float = 0.9
    seed: int = 0


@dataclass(frozen=True)
class UnlearnConfig:
    """Gradient ascent / difference settings: TOFU unlearns with the fine-tuning lr, 5 epochs."""

    lr: float = 1e-4
    batch_size: int = 8
    epochs: int = 5
    seed: int = 0


# --- encoding ---------------------------------------------------------------------------

def chat_prompt(tokenizer, question: str) -> str:
    """The question rendered as the chat template renders a user turn (as the guard does)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)


def encode(tokenizer, item: QAItem) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer + end-of-turn, and labels that score the answer only."""
    prompt_ids = tokenizer(chat_prompt(tokenizer, item.question), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(item.answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and loss."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)], labels[row, : len(y)], attention[row, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}


def batches(examples: list, batch_size: int, rng: random.Random, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """One shuffled epoch."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start: start + batch_size]], pad_id)


# --- loss and checks ----------------------------------------------------------------------

def shared_prefix(examples: Sequence[tuple[list[int], list[int]]]) -> list[int]:
    """The token prefix every example starts with (the chat template's system turn)."""
    prefix = examples[0][0]
    for ids, _ in examples[1:]:
        n = 0
        while n < min(len(prefix), len(ids)) and prefix[n] == ids[n]:
            n += 1
        prefix = prefix[:n]
    return prefix


def answer_nll(model, batch: dict[str, torch.Tensor], prefix: Sequence[int] = ()) -> tuple[torch.Tensor, int]:
    """Mean negative log-likelihood of the answer tokens in a batch, and how many rows
    have every answer token as the argmax (teacher-forced exact answers).

    With ``prefix`` (tokens every row starts with), the prefix runs once per step without
    gradient and its key/value cache is shared by the batch: about 40% less compute, at the
    price of no gradient through the prefix's keys and values (it is the fixed system turn).
    """
    ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    n = len(prefix)
    if n:
        with torch.no_grad():
            cache = model(input_ids=torch.tensor([list(prefix)]), use_cache=True).past_key_values
        cache.batch_repeat_interleave(ids.shape[0])
        logits = model(input_ids=ids[:, n:], attention_mask=attention, cache=cache).logits[:, :-1]
        target = labels[:, n + 1:]
    else:
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX)
    exact = ((logits.argmax(-1) == target) | (target == IGNORE_INDEX)).all(dim=1).sum()
    return loss, int(exact)


# --- training loops -------------------------------------------------------------------------

def _seed_all(seed: int) -> random.Random:
    torch.manual_seed(seed)
    return random.Random(seed)


def fine_tune(model, tokenizer, items: Sequence[QAItem], config: TrainConfig, desc: str) -> dict:
    """Fine-tune in place until the answers are memorised; returns a log of the run."""
    rng = _seed_all(config.seed)
    examples = [encode(tokenizer, item) for item in items]
    prefix = shared_prefix(examples)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / config.warmup_steps))
    model.train()
    history, start = [], time.perf_counter()
    for epoch in range(1, config.max_epochs + 1):
        losses, exact = [], 0
        steps = list(batches(examples, config.batch_size, rng, tokenizer.pad_token_id))
        for batch in tqdm(steps, desc=f"{desc} epoch {epoch}", leave=False):
            loss, batch_exact = answer_nll(model, batch, prefix)
            loss.backward()
            optimiser.step(), schedule.step(), optimiser.zero_grad()
            losses.append(loss.item())
            exact += batch_exact
        history.append({"epoch": epoch, "loss": round(sum(losses) / len(losses), 4),
                        "exact": round(exact / len(examples), 4), "seconds": round(time.perf_counter() - start, 1)})
        logger.info("%s %s", desc, history[-1])
        if epoch >= config.min_epochs and history[-1]["exact"] >= config.stop_exact:
            break
    return {"config": asdict(config), "history": history, "n_items": len(items),
            "seconds": round(time.perf_counter() - start, 1)}


def unlearn(model, tokenizer, forget: Sequence[QAItem], retain: Sequence[QAItem],
            method: str, config: UnlearnConfig) -> dict:
    """Gradient ascent (``grad_ascent``) or gradient difference (``grad_diff``) in place.

    Ascent maximises the forget answers' loss; difference also minimises the loss on a
    retain batch drawn alongside each forget batch, to protect utility (TOFU's baselines).
    """
    if method not in ("grad_ascent", "grad_diff"):
        raise ValueError(f"method must be 'grad_ascent' or 'grad_diff', not {method!r}")
    rng = _seed_all(config.seed)
    forget_ex = [encode(tokenizer, item) for item in forget]
    retain_ex = [encode(tokenizer, item) for item in retain]
    prefix = shared_prefix(forget_ex + retain_ex)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    model.train()
    history, start = [], time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        for batch in tqdm(list(batches(forget_ex, config.batch_size, rng, tokenizer.pad_token_id)),
                          desc=f"{method} epoch {epoch}", leave=False):
            forget_loss, _ = answer_nll(model, batch, prefix)
            loss = -forget_loss
            if method == "grad_diff":
                retain_batch = collate(rng.sample(retain_ex, config.batch_size), tokenizer.pad_token_id)
                loss = loss + answer_nll(model, retain_batch, prefix)[0]
            loss.backward()
            optimiser.step(), optimiser.zero_grad()
            history.append({"epoch": epoch, "forget_nll": forget_loss.item(), "loss": loss.item()})
    return {"config": asdict(config), "method": method, "history": history,
            "seconds": round(time.perf_counter() - start, 1)}


# --- cache ------------------------------------------------------------------------------------

def is_cached(name: str) -> bool:
    """Whether ``cache/<name>`` holds a finished model."""
    return (CACHE_DIR / name / INFO_FILE).exists() and (CACHE_DIR / name / "config.json").exists()


def load_model(path: Path | str):
    """An HF folder (or ``default``: the base SmolLM2) as (model, tokenizer) in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eco_guard.backends.local import resolve_model_dir

    folder = resolve_model_dir(str(path))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(folder)


def save(model, tokenizer, name: str, info: dict) -> Path:
    """Save a model folder; the info file is written last, marking it complete."""
    target = CACHE_DIR / name
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / INFO_FILE).write_text(json.dumps(info, indent=2))
    return target


def read_info(name: str) -> dict:
    """The training log saved with a cached model."""
    return json.loads((CACHE_DIR / name / INFO_FILE).read_text())


def build(name: str) -> dict:
    """Train ``name`` unless cached; returns its training log."""
    if is_cached(name):
        return read_info(name)
    torch.set_num_threads(NUM_THREADS)
    forget, retain = load_qa(["forget"]), load_qa(["retain"])
    if name in ("full", "retain"):
        model, tokenizer = load_model("default")
        items = forget + retain if name == "full" else retain
        info = fine_tune(model, tokenizer, items, TrainConfig(), desc=name)
    elif name in ("grad_ascent", "grad_diff"):
        build("full")
        model, tokenizer = load_model(CACHE_DIR / "full")
        info = unlearn(model, tokenizer, forget, retain, name, UnlearnConfig())
    else:
        raise ValueError(f"unknown model {name!r}; expected full, retain, grad_ascent or grad_diff")
    save(model, tokenizer, name, info)
    return info


MODELS: Final = ("full", "retain", "grad_ascent", "grad_diff")


def main(argv: Sequence[str] | None = None) -> None:
    """Build the requested models (default: all four)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(MODELS), choices=MODELS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in args.models:
        info = build(name)
        logger.info("%s ready (%.1f s)", name, info["seconds"])


if __name__ == "__main__":
    main()
