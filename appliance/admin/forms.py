"""The admin page's forms as msgspec Structs, and one decoder that turns bad input into a message.

Browsers send every field as a string, and an empty input as ``""``; ``read_form`` drops the
empty ones (so an optional field falls back to its default), collects repeated fields into a
list where the Struct wants one, and lets msgspec convert the rest. A failure becomes a
``FormError`` naming the field by its label, which the routes show next to the form (400),
never a 500.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar, get_type_hints

import msgspec
from litestar import Request
from msgspec import Meta

__all__ = [
    "AliasForm",
    "AliasNameForm",
    "DeleteForm",
    "FormError",
    "KeyCreateForm",
    "KeyLimitsForm",
    "KeyNameForm",
    "LoginForm",
    "ModelForm",
    "PriceForm",
    "PullForm",
    "TopupForm",
    "decode_form",
    "read_form",
]

S = TypeVar("S", bound=msgspec.Struct)

Name = Annotated[str, Meta(min_length=1, max_length=100)]
ModelId = Annotated[str, Meta(min_length=1, max_length=300)]
Positive = Annotated[int, Meta(ge=1, le=1_000_000_000)]
Credits = Annotated[str, Meta(max_length=40)]


class FormError(Exception):
    """Invalid form input: shown to the owner as ``message`` with a 400."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class LoginForm(msgspec.Struct, kw_only=True):
    password: Annotated[str, Meta(max_length=1000)] = ""
    next: str = "/admin"


class ModelForm(msgspec.Struct, kw_only=True):
    model: ModelId


class AliasForm(msgspec.Struct, kw_only=True):
    model: ModelId
    alias: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][\w.:/-]*$")]


class AliasNameForm(msgspec.Struct, kw_only=True):
    alias: Annotated[str, Meta(min_length=1, max_length=64)]


class DeleteForm(msgspec.Struct, kw_only=True):
    model: ModelId
    confirm: str = ""


class PriceForm(msgspec.Struct, kw_only=True):
    model: ModelId
    input: Credits
    output: Credits


class PullForm(msgspec.Struct, kw_only=True):
    url: Annotated[str, Meta(min_length=1, max_length=2000)]
    filename: Annotated[str, Meta(max_length=200)] = ""
    sha256: Annotated[str, Meta(max_length=64)] = ""


class KeyLimitsForm(msgspec.Struct, kw_only=True):
    name: Name
    rpm: Positive | None = None
    tpm: Positive | None = None
    concurrency: Positive | None = None
    models: list[str] = []
    expires: Annotated[str, Meta(max_length=40)] = ""
    allowance: Credits = ""
    allowance_period: Literal["day", "month"] = "day"


class KeyCreateForm(KeyLimitsForm, kw_only=True):
    credits: Credits = ""
    unlimited: bool = False


class KeyNameForm(msgspec.Struct, kw_only=True):
    name: Name


class TopupForm(msgspec.Struct, kw_only=True):
    name: Name
    amount: Credits


LABELS = {
    "password": "Password",
    "model": "Model",
    "alias": "Alias",
    "input": "Input price",
    "output": "Output price",
    "url": "URL",
    "filename": "File name",
    "sha256": "SHA-256",
    "name": "Name",
    "rpm": "Requests per minute",
    "tpm": "Tokens per minute",
    "concurrency": "Concurrent requests",
    "models": "Allowed models",
    "expires": "Expires",
    "allowance": "Allowance",
    "allowance_period": "Allowance period",
    "credits": "Credits",
    "amount": "Amount",
}

_PATH = re.compile(r" - at `\$\.(\w+)")
# Most specific first: the first prefix that matches msgspec's message wins.
_HINTS = (
    ("Expected `int` >= 1", "a number of at least 1"),
    ("Expected `int` <= ", "a smaller number"),
    ("Expected `int", "a whole number"),
    ("Expected `bool`", "yes or no"),
    (
        "Expected `str` matching regex",
        "letters, digits and . _ : / - (starting with one of the first two)",
    ),
    ("Expected `str` of length >= 1", "a value (it is required)"),
    ("Expected `str` of length <= ", "a shorter value"),
    ("Expected `array` of length", "fewer items"),
    ("Invalid enum value", "one of the offered choices"),
    ("Object missing required field", "a value (it is required)"),
)


_VERBATIM = {"password"}


def _friendly(exc: msgspec.ValidationError) -> FormError:
    text = str(exc)
    match = _PATH.search(text)
    field = match.group(1) if match else None
    if field is None and "missing required field" in text:
        field = text.rsplit("`", 2)[-2]
    label = LABELS.get(field or "", field or "The form")
    for prefix, hint in _HINTS:
        if text.startswith(prefix):
            return FormError(f"{label}: expected {hint}.", field)
    return FormError(f"{label}: {text.split(' - at ')[0]}.", field)


def _list_fields(struct: type[msgspec.Struct]) -> set[str]:
    hints = get_type_hints(struct, include_extras=False)
    return {
        name
        for name, hint in hints.items()
        if getattr(hint, "__origin__", None) is list and name in struct.__struct_fields__
    }


def decode_form(data: dict[str, Any], struct: type[S]) -> S:
    """Convert browser strings to ``struct``; raises FormError with a readable message."""
    try:
        return msgspec.convert(data, struct, strict=False)
    except msgspec.ValidationError as exc:
        raise _friendly(exc) from None


async def read_form(request: Request[Any, Any, Any], struct: type[S]) -> S:
    """Read an urlencoded (or multipart) form from ``request`` into ``struct``."""
    form = await request.form()
    lists = _list_fields(struct)
    data: dict[str, Any] = {}
    for name in struct.__struct_fields__:
        if name in lists:
            data[name] = [v.strip() for v in form.getall(name, []) if str(v).strip()]
            continue
        value = form.get(name)
        if isinstance(value, str) and value.strip():
            data[name] = value if name in _VERBATIM else value.strip()
    return decode_form(data, struct)
