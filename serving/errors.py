"""The one exception a request handler raises for bad client input; the app maps it to `{"error": msg}`."""

from __future__ import annotations


class RequestError(Exception):
    """A client mistake, answered with a 4xx status and a message meant for the caller."""

    def __init__(self, status: int, message: str) -> None:
        if not 400 <= status < 500:
            raise ValueError(f"RequestError is for 4xx statuses, got {status}")
        super().__init__(message)
        self.status = status
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[int, str]]:  # raised in a session host, re-raised by the replica
        return (RequestError, (self.status, self.message))
