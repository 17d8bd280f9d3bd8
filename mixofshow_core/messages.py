"""Error-message helpers: user input is quoted, never echoed whole."""

EXCERPT_CHARS = 60


def excerpt(text, limit=EXCERPT_CHARS):
    """repr() of `text`, cut to `limit` characters with the full length noted when longer."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"
