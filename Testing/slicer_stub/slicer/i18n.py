"""Stand-in for slicer.i18n (see ../README.md): no translation."""


def tr(text: str) -> str:
    """Mimics Base/Python/slicer/i18n.py tr (no translation here)."""
    return text


def translate(context: str, text: str) -> str:
    """Mimics Base/Python/slicer/i18n.py translate."""
    return text
