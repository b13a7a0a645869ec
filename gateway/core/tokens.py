"""Exact prompt-token counting, optional: a ``TokenCounter`` protocol and two loaders.

Without a counter, ``gateway.core.cost`` estimates tokens from characters. The loaders import
their package lazily, so neither ``tiktoken`` nor ``tokenizers`` is needed unless a policy names
one; a missing package raises ``TokenizerUnavailable`` saying what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Protocol


class TokenCounter(Protocol):
    def count(self, text: str) -> int:
        """Tokens the model's tokenizer makes of ``text``, without special tokens."""
        ...


class TokenizerUnavailable(RuntimeError):
    """The package a tokenizer needs is not installed, or the tokenizer cannot be built."""


def _require(module: str, extra: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TokenizerUnavailable(
            f"exact token counting with {module!r} needs the package: pip install {extra}"
        ) from exc


class _TiktokenEncoding(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


class _HFEncoding(Protocol):
    @property
    def ids(self) -> list[int]: ...


class _HFTokenizer(Protocol):
    def encode(self, sequence: str, *, add_special_tokens: bool) -> _HFEncoding: ...


class _TiktokenCounter:
    __slots__ = ("_encoding",)

    def __init__(self, encoding: _TiktokenEncoding) -> None:
        self._encoding = encoding

    def count(self, text: str) -> int:
        return len(self._encoding.encode_ordinary(text))


class _HFTokenizerCounter:
    __slots__ = ("_tokenizer",)

    def __init__(self, tokenizer: _HFTokenizer) -> None:
        self._tokenizer = tokenizer

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)


def tiktoken_counter(encoding_name: str) -> TokenCounter:
    """A counter for a ``tiktoken`` encoding such as ``cl100k_base`` or ``o200k_base``.

    ``tiktoken`` reads the encoding from its cache (``TIKTOKEN_CACHE_DIR``) or downloads it on
    first use, so call this when the policy is compiled, off the event loop, never per request.
    """
    tiktoken = _require("tiktoken", "tiktoken")
    try:
        encoding = tiktoken.get_encoding(encoding_name)
    except (ValueError, OSError) as exc:
        raise TokenizerUnavailable(
            f"tiktoken encoding {encoding_name!r} is not available: {exc}"
        ) from exc
    return _TiktokenCounter(encoding)


def tokenizer_json_counter(tokenizer_json: str) -> TokenCounter:
    """A counter from the text of a Hugging Face ``tokenizer.json`` (the caller reads the file).

    Needs the ``tokenizers`` package (``pip install kvgate[tokenizers]``).
    """
    tokenizers = _require("tokenizers", "'kvgate[tokenizers]'")
    try:
        tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    except Exception as exc:  # the Rust binding raises bare Exception on a bad file
        raise TokenizerUnavailable(f"not a valid tokenizer.json: {exc}") from exc
    return _HFTokenizerCounter(tokenizer)
