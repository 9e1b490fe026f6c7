"""Stand-in for slicer.i18n (see ../README.md): no translation."""


def tr(text: str) -> str:
    return text


def translate(context: str, text: str) -> str:
    return text
