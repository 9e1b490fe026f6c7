"""Text-encoder identifiers (no torch import: manifests and the CLI read them cheaply)."""

DEFAULT_ENCODER_ID = "minilm:all-MiniLM-L6-v2"
