"""The errors the engine raises to its callers; each carries the OpenAI error ``code`` it maps to."""

from __future__ import annotations


class EngineError(Exception):
    """Base of the errors the engine raises to its callers."""

    #: the OpenAI error code (``error.code``) of this kind of error, or None
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        #: the request field at fault, when there is one
        self.param = param


class ModelNotFound(EngineError):
    code = "model_not_found"

    def __init__(self, message: str) -> None:
        super().__init__(message, "model")


class InvalidRequest(EngineError):
    """The request cannot be served as it is (answered 400)."""


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class ModelLoadError(EngineError):
    """A model failed to load; the message has the reason. A later request may retry."""

    code = "model_load_failed"
