"""Prompt cleaning, the way the reference prepares text for umt5.

The reference tokenizer is created with ``clean='whitespace'``: it repairs the text with
ftfy (mojibake, HTML entities, full-width forms such as Chinese "，" -> ",", curly quotes,
NFC), unescapes HTML entities twice more, and collapses every run of whitespace to one
space. The same libraries are used here (ftfy, and `regex` whose ``\\s`` is the Unicode
White_Space class) so the cleaned strings, and therefore the token ids, match.
"""
from __future__ import annotations

import html

import ftfy
import regex

_WHITESPACE = regex.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """`text` as the reference feeds it to the tokenizer."""
    if not isinstance(text, str):
        raise TypeError(f"a prompt must be a str, got {type(text).__name__}")
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()
