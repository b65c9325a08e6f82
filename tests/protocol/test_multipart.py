"""Reading a multipart/form-data body in memory: what HTTP clients send is read back exactly,
and malformed bodies are refused with a reason."""

from __future__ import annotations

import httpx
import pytest

from dippy_studio.protocol.multipart import FormError, parse_form


def encoded(files: dict) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://orchestrator/", files=files)
    return request.read(), request.headers["content-type"]


def test_what_httpx_sends_is_read_back_byte_for_byte() -> None:
    # Content that looks like a delimiter, CRLFs and dashes included, must not end the part early.
    tricky = b"\x89PNG\r\n\x1a\n" + b"\r\n--not-the-boundary\r\n" * 50 + bytes(range(256))
    meta = ("meta.json", b'{"job_id": "req_1-1"}', "application/json")
    body, content_type = encoded({"meta": meta, "result": ("result.png", tricky, "image/png")})
    assert parse_form(body, content_type) == {"meta": b'{"job_id": "req_1-1"}', "result": tricky}


def test_quoted_boundaries_preambles_epilogues_and_empty_parts() -> None:
    body = (
        b"this preamble is ignored\r\n"
        b'--a b\r\nContent-Disposition: form-data; name="empty"\r\n\r\n\r\n'
        b'--a b\r\ncontent-disposition: form-data; name="meta"; filename="m.json"\r\n\r\n{}\r\n'
        b"--a b--\r\nand an epilogue"
    )
    assert parse_form(body, 'multipart/form-data; boundary="a b"') == {"empty": b"", "meta": b"{}"}


FORM = "multipart/form-data; boundary=x"
OK_PART = b'--x\r\nContent-Disposition: form-data; name="meta"\r\n\r\n{}\r\n'


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (OK_PART + b"--x--", "application/json", "not multipart/form-data"),
        (OK_PART + b"--x--", "multipart/form-data", "no usable boundary"),
        (b"--y\r\n" + OK_PART[4:], FORM, "does not start a part"),
        (OK_PART, FORM, "not terminated"),
        (OK_PART[:-8], FORM, "headers do not end"),
        (b"--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n--x--", FORM, "no Content-Disposition"),
        (b"--x\r\nContent-Disposition: attachment\r\n\r\nhi\r\n--x--", FORM, "form-data with a name"),
        (OK_PART + OK_PART[:-2] + b"\r\n--x--", FORM, "appears twice"),
        (b"--xjunk\r\n", FORM, "not followed by CRLF"),
    ],
)
def test_malformed_bodies_are_refused_with_a_reason(body: bytes, content_type: str, reason: str) -> None:
    with pytest.raises(FormError, match=reason):
        parse_form(body, content_type)


def test_the_number_of_parts_is_capped() -> None:
    body, content_type = encoded({name: (None, b"v") for name in "abc"})
    assert len(parse_form(body, content_type, max_parts=3)) == 3
    with pytest.raises(FormError, match="more than 2 parts"):
        parse_form(body, content_type, max_parts=2)
