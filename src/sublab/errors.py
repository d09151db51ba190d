"""User-facing errors: the CLI prints their message (problem + fix) and exits non-zero, no traceback."""


class SublabError(Exception):
    """A problem the user can fix (bad config, missing file, malformed data). Message says what and how."""
