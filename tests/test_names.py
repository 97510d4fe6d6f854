"""The one sanitiser: hostile names become safe identifiers, comments and file stems."""

from __future__ import annotations

import re

import pytest

from nnbridge.names import RESERVED, comment, identifier, is_valid_name, sanitize_name

HOSTILE = [
    'quote"name', "single'quote", "new\nline", "carriage\rreturn", "end*/comment", "/*open", "#hash",
    "{.emit: \"x\".}", "back\\slash", "../../etc/passwd", "/abs/path", "C:\\win\\path", "proc", "result",
    "kernel", "device", "threadgroup", "int", "class", "template", "main", "  ", "", "_", "__", "9lives",
    "über_net", "网络", "a" * 10_000, "x\x00y", "tab\tname", "semi;colon", "$(rm -rf)", "`cmd`", "Proc",
    "RESULT", "if_", "a__b", "trailing_", "_leading",
]
IDENT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*(_[A-Za-z0-9]+)*$")


@pytest.mark.parametrize("name", HOSTILE)
def test_identifier_is_safe_everywhere(name):
    ident = identifier(name)
    assert IDENT_RE.match(ident), ident
    assert len(ident) <= 48
    assert ident.lower() not in RESERVED and ident.replace("_", "").lower() not in RESERVED
    assert "/" not in ident and "." not in ident


@pytest.mark.parametrize("name", HOSTILE)
def test_comment_text_cannot_break_out(name):
    c = comment(name)
    assert "\n" not in c and "\r" not in c and "*/" not in c and "/*" not in c
    assert "#" not in c and "{." not in c and "\\" not in c and '"' not in c and "\x00" not in c
    assert len(c) <= 80


@pytest.mark.parametrize("name", HOSTILE)
def test_sanitize_name_gives_valid_layer_names(name):
    s = sanitize_name(name)
    assert is_valid_name(s), s


def test_distinct_long_names_stay_distinct():
    a, b = "x" * 200 + "a", "x" * 200 + "b"
    assert identifier(a) != identifier(b)
    assert sanitize_name(a) != sanitize_name(b)


def test_plain_names_are_kept():
    assert identifier("SimpleMLP") == "SimpleMLP"
    assert identifier("KoanClassifier") == "KoanClassifier"
    assert sanitize_name("hidden1") == "hidden1"
    assert sanitize_name("layers.0") == "layers_0"
