"""Text encoders that turn class prompts into the embeddings the parameter generator reads."""

from UniversalSegLib.text.encoders import (
    DEFAULT_ENCODER_ID,
    CLIPTextEncoder,
    MiniLMEncoder,
    TextEncoder,
    embed_prompts,
    get_text_encoder,
)

__all__ = ["DEFAULT_ENCODER_ID", "CLIPTextEncoder", "MiniLMEncoder", "TextEncoder",
           "embed_prompts", "get_text_encoder"]
