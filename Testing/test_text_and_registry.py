"""Text encoders (offline MiniLM, CLIP via transformers) and the class registry."""

from __future__ import annotations

import pytest
import torch

from UniversalSegLib.errors import UnknownClassError
from UniversalSegLib.registry import GROUPS, default_registry
from UniversalSegLib.text import CLIPTextEncoder, embed_prompts


def test_minilm_similarity(minilm):
    e = embed_prompts(minilm, ["liver", "liver tumor", "femur"])
    assert e.shape == (3, 384)
    cos = torch.nn.functional.cosine_similarity
    assert cos(e[0], e[1], dim=0) > cos(e[0], e[2], dim=0)


def test_clip_text_tower_tiny_random():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

    # A tiny word-level tokenizer and a randomly initialised CLIP text tower: no download needed.
    words = ["<|startoftext|>", "<|endoftext|>", "a", "computerized", "tomography", "of", "liver", "spleen"]
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = dict.fromkeys(words + [c + "</w>" for c in letters] + list(letters))
    vocab = {w: i for i, w in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    tokenizer = CLIPTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, eos_token_id=1, bos_token_id=0,
                         pad_token_id=1)
    torch.manual_seed(0)
    encoder = CLIPTextEncoder("tiny-random", model=CLIPTextModel(cfg), tokenizer=tokenizer)
    emb = embed_prompts(encoder, ["liver", "spleen"])
    assert emb.shape == (2, 32) and encoder.dim == 32
    assert not torch.allclose(emb[0], emb[1])
    assert encoder.encoder_id == "clip:tiny-random"


def test_registry_has_template_and_shared_structures():
    reg = default_registry()
    template = reg.template_32()
    assert [c.template_id for c in template] == list(range(1, 33))
    assert template[5].key == "liver" and template[26].key == "liver_tumor"
    for key in ["heart", "pulmonary_artery", "superior_mesenteric_artery", "vertebrae_T12", "aorta"]:
        assert key in reg
    for c in reg:
        assert c.group in GROUPS and len(c.color) == 3
        assert c.terminology["category"][0] == "SCT" and c.terminology["type"][1].isdigit()
        for p in c.parents:
            assert p in reg
    assert reg["liver_tumor"].parents == ["liver"]
    assert reg["kidney_left"].terminology["modifier"][2] == "Left"


def test_registry_lookup_by_synonym_and_error():
    reg = default_registry()
    assert reg.resolve("Postcava").key == "inferior_vena_cava"
    assert reg.resolve("left kidney").key == "kidney_left"
    with pytest.raises(UnknownClassError, match="unknown class"):
        reg.resolve("unicorn horn")


def test_terminology_entry_format():
    entry = default_registry()["kidney_left"].terminology_entry()
    parts = entry.split("~")
    assert len(parts) == 7 and parts[1] == "SCT^123037004^Anatomical Structure"
    assert parts[2] == "SCT^64033007^Kidney" and parts[3] == "SCT^7771000^Left"
