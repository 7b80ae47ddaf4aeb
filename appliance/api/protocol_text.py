"""Wire types of the text-completion and embedding endpoints (legacy but widely used)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from appliance.api.protocol import GenerationFields, Usage
from appliance.errors import InvalidRequestError

__all__ = [
    "Completion",
    "CompletionChoice",
    "CompletionRequest",
    "Embedding",
    "EmbeddingList",
    "EmbeddingRequest",
    "EmbeddingUsage",
    "input_items",
]

# msgspec unions allow one list type: the list's items are checked by ``input_items``.
Inputs = str | Annotated[list[str | int | list[int]], Meta(min_length=1, max_length=256)]


class CompletionRequest(GenerationFields, kw_only=True):
    prompt: Inputs
    max_tokens: Annotated[int, Meta(ge=1)] | None = 16
    echo: bool | None = False


class CompletionChoice(msgspec.Struct, kw_only=True):
    text: str
    index: int
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class Completion(msgspec.Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: Literal["text_completion"] = "text_completion"
    # Left out of the JSON while UNSET (OpenAI's schema has no null here): stream chunks
    # carry no usage; only the final include_usage chunk and whole responses do.
    usage: Usage | UnsetType = UNSET


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    input: Inputs
    model: str = ""
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    user: str | None = None


class Embedding(msgspec.Struct, kw_only=True):
    index: int
    embedding: list[float] | str
    object: Literal["embedding"] = "embedding"


def input_items(value: str | list[str | int | list[int]], param: str) -> list[str | list[int]]:
    """OpenAI's input forms -> a list of texts or token lists; a 400 for mixed or empty ones."""
    if isinstance(value, str):
        items: list[str | list[int]] = [value]
    elif all(isinstance(v, int) for v in value):
        items = [[int(v) for v in value if isinstance(v, int)]]
    elif all(isinstance(v, str) for v in value):
        items = [v for v in value if isinstance(v, str)]
    elif all(isinstance(v, list) for v in value):
        items = [v for v in value if isinstance(v, list)]
    else:
        raise InvalidRequestError(
            f"'{param}' must be a string, a list of strings, a list of token ids or a list of "
            "token-id lists",
            param=param,
        )
    for item in items:
        if not item:
            raise InvalidRequestError(f"'{param}' contains an empty input", param=param)
        if isinstance(item, list) and any(t < 0 for t in item):
            raise InvalidRequestError(f"'{param}' contains a negative token id", param=param)
    return items


class EmbeddingUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct, kw_only=True):
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    object: Literal["list"] = "list"
