"""Policy text → validated ``schema.Policy``, with errors that name the file, line and key path.

msgspec reports ``$.tenants.acme.limits[0].rate``; we add the YAML line of that node (from the
composed node tree, which keeps marks) and, for unknown keys, the closest known key.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path

import msgspec
import yaml

from gateway.errors import PolicyError
from gateway.policy import schema

_PATH_RE = re.compile(r" - at `(\$[^`]*)`$")
_SEGMENT_RE = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_MAP_KEY = "..."  # msgspec's placeholder for a mapping key it does not name
_UNKNOWN_RE = re.compile(r"^Object contains unknown field `([^`]+)`")
_FIELD_RE = re.compile(r"^`([a-z_]+)`: ")  # a schema check naming the field it failed on
_LOCATED_RE = re.compile(r"^at (\$\S*): ")  # a compile-time error naming its key path


def load_file(path: str | Path) -> schema.Policy:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(str(path), f"cannot read: {exc.strerror or exc}") from exc
    return load_text(text, source=str(path))


def load_text(text: str, source: str = "<string>") -> schema.Policy:
    if not text.strip():
        raise PolicyError(source, "the file is empty; a policy needs `version: 1` and `models`")
    try:
        return msgspec.yaml.decode(text.encode(), type=schema.Policy)
    except msgspec.ValidationError as exc:
        raise PolicyError(source, _describe(str(exc), text)) from exc
    except msgspec.DecodeError as exc:
        raise PolicyError(source, _describe_syntax(exc, text)) from exc


def _describe(message: str, text: str) -> str:
    match = _PATH_RE.search(message)
    what = message[: match.start()] if match else message
    segments = _resolve_keys(_segments(match.group(1) if match else "$"), text)
    key_path = _join(segments)
    unknown = _UNKNOWN_RE.match(what)
    named = _FIELD_RE.match(what)
    if named is not None:
        segments = [*segments, named.group(1)]
        key_path = _join(segments)
        what = what[named.end() :]
    elif unknown is not None:
        hint = _did_you_mean(unknown.group(1), segments)
        segments = [*segments, unknown.group(1)]
        key_path = _join(segments)
        what = f"unknown key `{unknown.group(1)}`{hint}"
    line = _line_of(text, segments)
    where = f"line {line}, at {key_path}" if line else f"at {key_path}"
    return f"{where}: {what}"


def locate(error: PolicyError, text: str) -> PolicyError:
    """Add the line to a compile-time error that names only its key path."""
    match = _LOCATED_RE.match(error.detail)
    if match is None:
        return error
    line = _line_of(text, _segments(match.group(1)))
    if line is None:
        return error
    return PolicyError(error.source, f"line {line}, {error.detail}")


def _describe_syntax(exc: msgspec.DecodeError, text: str) -> str:
    cause = exc.__cause__ or exc.__context__
    mark = getattr(cause, "problem_mark", None)
    if isinstance(cause, yaml.YAMLError) and mark is not None:
        problem = getattr(cause, "problem", None) or "invalid YAML"
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return str(exc) if text.strip() else "the file is empty"


def _segments(key_path: str) -> list[str | int]:
    return [
        name if name else (_MAP_KEY if index == _MAP_KEY else int(index))
        for name, index in _SEGMENT_RE.findall(key_path.removeprefix("$"))
    ]


def _resolve_keys(segments: list[str | int], text: str) -> list[str | int]:
    """Replace msgspec's ``[...]`` with the mapping key whose value fails to decode."""
    if _MAP_KEY not in segments:
        return segments
    try:
        node: object = yaml.safe_load(text)
    except yaml.YAMLError:
        return segments
    resolved: list[str | int] = []
    for segment in segments:
        if segment == _MAP_KEY and isinstance(node, dict):
            value_type = typing.get_args(_strip(_hint_at(resolved)))[-1]
            segment = next((k for k, v in node.items() if not _decodes(v, value_type)), segment)
        resolved.append(segment)
        if isinstance(node, dict):
            node = node.get(segment)
        elif isinstance(node, list) and isinstance(segment, int) and segment < len(node):
            node = node[segment]
        else:
            node = None
    return resolved


def _decodes(value: object, hint: object) -> bool:
    try:
        msgspec.convert(value, hint)
    except msgspec.ValidationError:
        return False
    return True


def _join(segments: list[str | int]) -> str:
    return "$" + "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in segments)


def _line_of(text: str, segments: list[str | int]) -> int | None:
    """1-based line of the node at ``segments``, or of its deepest existing parent."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    if node is None:
        return None
    line: int = node.start_mark.line + 1
    for segment in segments:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == segment:
                    child = key if segment == segments[-1] else value
                    break
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(segment, int)
            and segment < len(node.value)
        ):
            child = node.value[segment]
        if child is None:
            break
        node = child
        line = node.start_mark.line + 1
    return line


def _did_you_mean(name: str, segments: list[str | int]) -> str:
    struct = _struct_at(segments)
    if struct is None:
        return ""
    known = list(struct.__struct_fields__)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean `{close[0]}`?"
    return f"; expected one of: {', '.join(known)}"


def _struct_at(segments: list[str | int]) -> type[msgspec.Struct] | None:
    return _as_struct(_hint_at(segments))


def _hint_at(segments: list[str | int]) -> object:
    """The type that the node at ``segments`` decodes into, following the schema's hints."""
    current: object = schema.Policy
    for segment in segments:
        struct = _as_struct(current)
        if struct is not None and isinstance(segment, str):
            current = typing.get_type_hints(struct, include_extras=True).get(segment)
            continue
        args = typing.get_args(_strip(current))
        if not args:
            return None
        current = args[-1]  # dict[str, X] and list[X] both end with X
    return current


def _strip(hint: object) -> object:
    while typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    return hint


def _as_struct(hint: object) -> type[msgspec.Struct] | None:
    hint = _strip(hint)
    if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
        return hint
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        for arg in typing.get_args(hint):
            if isinstance(arg, type) and issubclass(arg, msgspec.Struct):
                return arg
    return None
