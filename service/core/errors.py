"""Two kinds of failure, because they need opposite handling: retry later, or record and stop."""

from __future__ import annotations


class PermanentError(Exception):
    """Retrying cannot help (bad input, refused by the peer): record a coded reason and stop."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TransientError(Exception):
    """The world may be better later (peer down, database busy): retry with backoff."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
