"""Reading a multipart/form-data body that is already in memory (RFC 7578).

Miners call back with a small multipart form (a JSON `meta` part and the result file), and the
orchestrator has the whole body anyway: the signature covers its bytes. Splitting it at the
boundary with `bytes.find` costs a few microseconds; a streaming form parser (Starlette's, with
a spooled temporary file per file part) cost more than everything else a callback does.
Headers are parsed with python-multipart's `parse_options_header`, which handles quoting.
"""

from __future__ import annotations

from python_multipart.multipart import parse_options_header

MAX_PARTS = 16
_MAX_HEADER_BYTES = 8192


class FormError(ValueError):
    """The body is not a multipart/form-data form this reader accepts; the message says why."""


def parse_form(body: bytes, content_type: str | None, max_parts: int = MAX_PARTS) -> dict[str, bytes]:
    """The form's fields by name, each the raw bytes of its part (files and plain fields alike).
    Raises `FormError` for a missing boundary, a malformed or unterminated part, a part without a
    name, a repeated name, or more than `max_parts` parts."""
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        raise FormError("Content-Type is not multipart/form-data")
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > 70:  # RFC 2046: 1 to 70 characters
        raise FormError("no usable boundary in Content-Type")
    delimiter = b"--" + boundary
    # What precedes the first delimiter is a preamble, to be ignored.
    position = body.find(delimiter)
    if position < 0 or (position > 0 and body[position - 2 : position] != b"\r\n"):
        raise FormError("the body does not start a part with the boundary")
    position += len(delimiter)
    fields: dict[str, bytes] = {}
    while True:
        if body.startswith(b"--", position):
            return fields  # the closing delimiter; anything after it is an epilogue
        if not body.startswith(b"\r\n", position):
            raise FormError("a boundary line is not followed by CRLF")
        if len(fields) == max_parts:
            raise FormError(f"more than {max_parts} parts")
        head_start = position + 2
        head_end = body.find(b"\r\n\r\n", head_start, head_start + _MAX_HEADER_BYTES)
        if head_end < 0:
            raise FormError("a part's headers do not end (or are too long)")
        name = _field_name(body[head_start:head_end])
        if name in fields:
            raise FormError(f"the field {name!r} appears twice")
        content_start = head_end + 4
        content_end = body.find(b"\r\n" + delimiter, content_start)
        if content_end < 0:
            raise FormError(f"the part {name!r} is not terminated by the boundary")
        fields[name] = body[content_start:content_end]
        position = content_end + 2 + len(delimiter)


def _field_name(head: bytes) -> str:
    for line in head.split(b"\r\n"):
        header, _, value = line.partition(b":")
        if header.strip().lower() == b"content-disposition":
            disposition, options = parse_options_header(value.strip())
            name = options.get(b"name")
            if disposition != b"form-data" or name is None:
                raise FormError("a part's Content-Disposition is not form-data with a name")
            return name.decode("utf-8", errors="replace")
    raise FormError("a part has no Content-Disposition header")
