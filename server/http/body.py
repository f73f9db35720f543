"""A request body as JSON, checked for what ``json.loads`` lets through and a request message
cannot hold: nesting deeper than ``MAX_DEPTH`` (refused before the parser recurses; 10,000 levels
used to raise RecursionError), and strings that are not valid Unicode (``"\\ud800"`` escapes, or
raw CESU bytes that ``json.loads`` decodes with ``surrogatepass``), named by their field path.
Run it off the event loop: a 4 MiB body takes tens of milliseconds.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

MAX_DEPTH = 64  # arrays and objects inside each other; tool schemas need a dozen
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes included
_OPEN, _CLOSE = (ord("["), ord("{")), (ord("]"), ord("}"))


class BodyError(ValueError):
    """The body is not a JSON object a request can be read from (a 400); ``param`` the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def nesting_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in ``raw``, brackets inside strings not counted."""
    codes = np.frombuffer(_STRING.sub(b"", raw), dtype=np.uint8)
    opens = (codes == _OPEN[0]) | (codes == _OPEN[1])
    closes = (codes == _CLOSE[0]) | (codes == _CLOSE[1])
    return int(np.cumsum(opens.astype(np.int32) - closes.astype(np.int32)).max(initial=0))


def surrogate(value: Any, path: str = "") -> tuple[str, int] | None:
    """The first string (key or value) holding a lone surrogate: (its field path, the index)."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            return path, exc.start
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            name = key.encode("utf-8", "backslashreplace").decode()  # the path goes back in the error
            where = f"{path}.{name}" if path else name
            found = surrogate(key, where) or surrogate(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = surrogate(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; BodyError with a message for the client otherwise."""
    depth = nesting_depth(raw)
    if depth > MAX_DEPTH:
        raise BodyError(f"the request body nests {depth} levels deep; at most {MAX_DEPTH} are allowed")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BodyError(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise BodyError(f"the request body must be a JSON object, got {type(body).__name__}")
    found = surrogate(body)
    if found is not None:
        where, index = found
        raise BodyError(f"{where}: not valid Unicode (lone surrogate at character {index})", where)
    return body
