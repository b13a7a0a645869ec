"""Policy text → validated ``schema.Policy``, with errors that name the file, line and key path.

The text is composed once into YAML nodes (libyaml's C composer where PyYAML has it), which keep
their lines: duplicate keys are refused there, before YAML's last-one-wins drops a block. The
values are then checked against the schema subtree by subtree, so one run reports every error of
the file, each as ``line N, at $.key.path: what was expected``.
"""

from __future__ import annotations

import contextlib
import difflib
import enum
import gc
import math
import os
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import yaml

from gateway.errors import PolicyError
from gateway.policy import schema, units

MAX_POLICY_BYTES = 8 * 2**20  # checked before parsing: a reload attempt never costs more
MAX_REPORTED = 50  # errors listed for one file; the rest are counted
_MAX_NODES = 2_000_000  # after anchors and aliases are expanded
_MAX_DEPTH = 100  # a policy nests about 8 deep; libyaml's composer recurses in C
_OPENS = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSES = (yaml.MappingEndEvent, yaml.SequenceEndEvent)

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_PATH_RE = re.compile(r" - at `(\$[^`]*)`$")
_SEGMENT_RE = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_UNKNOWN_RE = re.compile(r"^Object contains unknown field `([^`]+)`")
_ENUM_RE = re.compile(r"^Invalid enum value ")
_FIELD_RE = re.compile(r"^`([a-z_]+)`: ")  # a schema check naming the field it failed on
_LOCATED_RE = re.compile(r"^at (\$\S*): ")  # a compile-time error naming its key path
_LONG_QUOTE_RE = re.compile(r"'([^'\n]{40})[^'\n]{8,}'")

Segments = list[str | int]


class PolicyErrors(PolicyError):
    """Every error found in one file, each on its own ``source: detail`` line."""

    def __init__(self, source: str, details: list[str]) -> None:
        shown = details[:MAX_REPORTED]
        if len(details) > len(shown):
            shown.append(f"... and {len(details) - len(shown)} more errors")
        super().__init__(source, f"\n{source}: ".join(shown))
        self.details = tuple(details)


@dataclass(frozen=True, slots=True)
class _Problem:
    segments: Segments
    what: str
    line: int | None = None  # where the path alone does not say (a duplicate key)


@dataclass(slots=True)
class Document:
    """A decoded policy and the YAML nodes it came from, to put lines on later errors."""

    spec: schema.Policy
    source: str
    _root: yaml.Node
    _index: dict[int, dict[object, tuple[yaml.Node, yaml.Node]]] = field(default_factory=dict)

    def locate(self, error: PolicyError) -> PolicyError:
        """Add the line to a compile-time error that names only its key path."""
        match = _LOCATED_RE.match(error.detail)
        if match is None:
            return error
        line = _line_of(self._root, _segments(match.group(1)), self._index)
        return PolicyError(error.source, f"line {line}, {error.detail}")


def read_source(path: Path) -> bytes:
    """The file's bytes, refused unread when it is larger than the cap."""
    try:
        with path.open("rb") as file:
            size = _size(file.fileno())
            if size > MAX_POLICY_BYTES:
                raise PolicyError(str(path), _too_large(size))
            data = file.read(MAX_POLICY_BYTES + 1)  # the file may grow between stat and read
    except OSError as exc:
        raise PolicyError(str(path), f"cannot read: {exc.strerror or exc}") from exc
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(str(path), _too_large(len(data)))
    return data


def decode_text(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PolicyError(source, f"line {line}: not UTF-8 (byte {exc.start})") from None


def load_text(text: str, source: str = "<string>") -> schema.Policy:
    return parse(text, source).spec


def parse(text: str, source: str = "<string>") -> Document:
    """Decode ``text``; raises ``PolicyError`` (``PolicyErrors`` for several) with every error."""
    size = len(text.encode())
    if size > MAX_POLICY_BYTES:
        raise PolicyError(source, _too_large(size))
    if not text.strip():
        raise PolicyError(source, "the file is empty; a policy needs `version: 1` and `models`")
    with collector_paused():
        root, data, problems = _compose(text, source)
        spec, found = _check(data, schema.Policy, [])
    index: dict[int, dict[object, tuple[yaml.Node, yaml.Node]]] = {}
    problems += found
    if problems or spec is None:
        details = sorted(
            (
                (p.line or _line_of(root, p.segments, index), _join(p.segments), p.what)
                for p in problems
            ),
            key=lambda item: item[0],
        )
        messages = [_shorten(f"line {line}, at {where}: {what}") for line, where, what in details]
        if len(messages) == 1:
            raise PolicyError(source, messages[0])
        raise PolicyErrors(source, messages)
    return Document(spec, source, root, index)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Building a large file allocates a million objects that all stay alive, and each time
    the cycle collector runs it walks every one of them: about 70% of the time on a 5 MB file.
    The tree holds no cycles worth collecting during the parse, so the collector waits."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _compose(text: str, source: str) -> tuple[yaml.Node, object, list[_Problem]]:
    """The node tree, the plain values built from it (one parse for both) and the keys given
    twice."""
    _check_depth(text, source)
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise PolicyError(source, "the file holds only comments; a policy needs `models`")
        duplicates, shared = _duplicates(root)
        if shared:
            _count_nodes(root, source)
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        raise PolicyError(source, _describe_syntax(exc, text)) from None
    except yaml.YAMLError as exc:
        raise PolicyError(source, f"invalid YAML: {units.excerpt(str(exc))}") from None
    except RecursionError:
        raise PolicyError(source, "nested too deeply to be a policy") from None
    finally:
        loader.dispose()
    return root, data, duplicates


def _check_depth(text: str, source: str) -> None:
    """Refuse deep nesting before composing: the C composer recurses once per level and a few
    tens of thousands of ``[`` (a small file) overflow the thread's stack, which ends the process
    rather than raising. The event parser keeps its own stack, and its events are cheap."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, _OPENS):
                depth += 1
                if depth > _MAX_DEPTH:
                    line = event.start_mark.line + 1 if event.start_mark else 1
                    raise PolicyError(source, f"line {line}: nested more than {_MAX_DEPTH} deep")
            elif isinstance(event, _CLOSES):
                depth -= 1
    except yaml.MarkedYAMLError as exc:
        raise PolicyError(source, _describe_syntax(exc, text)) from None
    except yaml.YAMLError as exc:
        raise PolicyError(source, f"invalid YAML: {units.excerpt(str(exc))}") from None


def _describe_syntax(exc: yaml.MarkedYAMLError, text: str) -> str:
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or "invalid YAML"
    if mark is None:
        return problem
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    lines = text.splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    if "\t" in problem or "\t" in line[: mark.column + 1]:
        return (
            f"{where}: a tab character; YAML indents with spaces only (replace the tab with spaces)"
        )
    return f"{where}: {_shorten(problem)}"


def _count_nodes(root: yaml.Node, source: str) -> None:
    """Refuse anchors and aliases that expand past any real policy (a "billion laughs" file
    is small on disk and enormous once every alias is walked)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children = list(_children(node))
        if not done:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        sizes[id(node)] = min(_MAX_NODES + 1, 1 + sum(sizes.get(id(c), 1) for c in children))
    if sizes[id(root)] > _MAX_NODES:
        raise PolicyError(source, f"anchors and aliases expand to more than {_MAX_NODES} values")


def _children(node: yaml.Node) -> Iterator[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield key
            yield value
    elif isinstance(node, yaml.SequenceNode):
        yield from node.value


def _duplicates(root: yaml.Node) -> tuple[list[_Problem], bool]:
    """A key given twice in one mapping: YAML keeps the last, which would silently drop the
    first block (a tenant's keys and limits), so both lines are named. Also says whether any
    node is reached twice (an alias)."""
    problems: list[_Problem] = []
    seen: set[int] = set()
    shared = False
    stack: list[tuple[yaml.Node, Segments]] = [(root, [])]
    while stack:
        node, segments = stack.pop()
        if id(node) in seen:
            shared = True
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    continue
                line = key.start_mark.line + 1
                if key.value in first:
                    problems.append(
                        _Problem(
                            [*segments, key.value],
                            f"duplicate key `{units.excerpt(key.value)[1:-1]}`, first at line "
                            f"{first[key.value]}; YAML would keep only this one",
                            line,
                        )
                    )
                    continue
                first[key.value] = line
                stack.append((value, [*segments, key.value]))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, [*segments, i]) for i, item in enumerate(node.value))
    return problems, shared


def _check(value: object, hint: object, segments: Segments) -> tuple[typing.Any, list[_Problem]]:
    """Convert ``value`` to ``hint``; on failure, check each part on its own so every error of
    the subtree is found, falling back to msgspec's own error where no part fails alone."""
    try:
        return msgspec.convert(value, hint), []
    except msgspec.ValidationError as exc:
        fallback = _from_msgspec(str(exc), value, hint, segments)
    except RecursionError:
        return None, [_Problem(segments, "nested too deeply to be a policy")]
    deeper = _check_parts(value, hint, segments)
    return None, deeper or [fallback]


def _check_parts(value: object, hint: object, segments: Segments) -> list[_Problem]:
    hint = _strip(hint)
    options = [a for a in _union_args(hint) if a is not type(None)]
    if value is None or len(options) == 0:
        return []
    structs = [s for s in map(_struct_of, options) if s is not None]
    if isinstance(value, dict) and structs:
        return _check_struct(value, structs, segments)
    if len(options) != 1:
        return []
    origin = typing.get_origin(_strip(options[0]))
    args = typing.get_args(_strip(options[0]))
    problems: list[_Problem] = []
    if origin is dict and isinstance(value, dict):
        for key, item in value.items():
            problems += _check(item, args[1], [*segments, key])[1]
    elif origin is list and isinstance(value, list):
        for i, item in enumerate(value):
            problems += _check(item, args[0], [*segments, i])[1]
    return problems


def _check_struct(
    value: dict[object, object], structs: list[type[msgspec.Struct]], segments: Segments
) -> list[_Problem]:
    struct = structs[0]
    tag_field = struct.__struct_config__.tag_field
    if tag_field is not None:
        tags = {s.__struct_config__.tag: s for s in structs}
        tag = value.get(tag_field)
        if tag not in tags:
            allowed = ", ".join(str(t) for t in tags)
            what = "missing" if tag is None else f"unknown value {units.excerpt(tag)}"
            return [_Problem([*segments, tag_field], f"{what}; expected one of: {allowed}")]
        struct = tags[tag]
    hints = typing.get_type_hints(struct, include_extras=True)
    problems = []
    for key, item in value.items():
        if key == tag_field:
            continue
        if key not in hints:
            name = str(key)
            what = f"unknown key `{units.excerpt(name)[1:-1]}`{_did_you_mean(name, struct)}"
            problems.append(_Problem([*segments, name], what))
            continue
        problems += _check(item, hints[key], [*segments, str(key)])[1]
    for info in msgspec.structs.fields(struct):
        if info.required and info.encode_name not in value:
            problems.append(_Problem(segments, f"missing required key `{info.encode_name}`"))
    return problems


def _from_msgspec(message: str, value: object, hint: object, base: Segments) -> _Problem:
    match = _PATH_RE.search(message)
    what = message[: match.start()] if match else message
    relative = _segments(match.group(1)) if match else []
    segments = [*base, *relative]
    named = _FIELD_RE.match(what)
    if named is not None:
        return _Problem([*segments, named.group(1)], what[named.end() :])
    if _ENUM_RE.match(what):
        allowed = _allowed(_hint_at(hint, relative))
        if allowed:
            what = f"{what}; expected one of: {', '.join(allowed)}"
    number = _value_at(value, relative)
    if isinstance(number, int | float) and not isinstance(number, bool):
        what = f"{what}, got {_number(number)}"
    return _Problem(segments, what)


def _value_at(value: object, segments: Segments) -> object:
    for segment in segments:
        if isinstance(value, dict):
            value = value.get(segment)
        elif isinstance(value, list) and isinstance(segment, int) and segment < len(value):
            value = value[segment]
        else:
            return None
    return value


def _number(value: int | float) -> str:
    """A number as the policy wrote it, never a 400-digit echo."""
    if isinstance(value, float) and math.isnan(value):
        return ".nan (not a number)"
    if isinstance(value, float) and math.isinf(value):
        return f"{'-' if value < 0 else ''}.inf (numbers must be finite)"
    text = str(value)
    if len(text) > 20:
        return f"a {len(text.lstrip('-'))}-digit number"
    return text


def _allowed(hint: object) -> list[str]:
    values: list[str] = []
    for option in _union_args(_strip(hint)):
        if isinstance(option, type) and issubclass(option, enum.Enum):
            values += [str(member.value) for member in option]
        elif typing.get_origin(option) is typing.Literal:
            values += [str(arg) for arg in typing.get_args(option)]
    return values


def _did_you_mean(name: str, struct: type[msgspec.Struct]) -> str:
    known = list(struct.__struct_fields__)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean `{close[0]}`?"
    return f"; expected one of: {', '.join(known)}"


def _hint_at(hint: object, segments: Segments) -> object:
    """The type the node at ``segments`` below ``hint`` decodes into."""
    current = hint
    for segment in segments:
        options = [_strip(a) for a in _union_args(_strip(current)) if a is not type(None)]
        structs = [s for s in map(_struct_of, options) if s is not None]
        struct = next((s for s in structs if segment in s.__struct_fields__), None)
        if struct is not None:
            current = typing.get_type_hints(struct, include_extras=True)[str(segment)]
            continue
        args = typing.get_args(options[0]) if len(options) == 1 else ()
        if not args:
            return None
        current = args[-1]  # dict[str, X] and list[X] both end with X
    return current


def _union_args(hint: object) -> tuple[object, ...]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(_strip(a) for a in typing.get_args(hint))
    return (hint,)


def _strip(hint: object) -> object:
    while typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    return hint


def _struct_of(hint: object) -> type[msgspec.Struct] | None:
    hint = _strip(hint)
    return hint if isinstance(hint, type) and issubclass(hint, msgspec.Struct) else None


def _segments(key_path: str) -> Segments:
    return [
        name if name else (index if index == "..." else int(index))
        for name, index in _SEGMENT_RE.findall(key_path.removeprefix("$"))
    ]


def _join(segments: Segments) -> str:
    """The key path; a long key (a tenant named with a megabyte) is cut like any value."""
    return "$" + "".join(
        f"[{s}]" if isinstance(s, int) else f".{s if len(s) <= 40 else s[:39] + '…'}"
        for s in segments
    )


def _line_of(
    root: yaml.Node,
    segments: Segments,
    index: dict[int, dict[object, tuple[yaml.Node, yaml.Node]]],
) -> int:
    """1-based line of the node at ``segments`` (its key's line for a mapping entry), or of its
    deepest existing parent; ``index`` caches each mapping's keys (many errors, one walk each)."""
    node = root
    line: int = root.start_mark.line + 1
    for position, segment in enumerate(segments):
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            keys = index.get(id(node))
            if keys is None:
                keys = index[id(node)] = {}
                for key, value in node.value:
                    # the first occurrence: a duplicate is reported at its own key
                    name = key.value if isinstance(key, yaml.ScalarNode) else id(key)
                    keys.setdefault(name, (key, value))
            entry = keys.get(segment)
            if entry is not None:
                child = entry[0] if position == len(segments) - 1 else entry[1]
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


def _shorten(message: str) -> str:
    """Cut any long quoted value in a message (msgspec quotes a bad enum value whole)."""
    return _LONG_QUOTE_RE.sub(lambda m: f"'{m.group(1)}…'", message)


def _size(fd: int) -> int:
    return os.fstat(fd).st_size


def _too_large(size: int) -> str:
    return (
        f"the file is {size / 2**20:.1f} MiB; policies are limited to "
        f"{MAX_POLICY_BYTES // 2**20} MiB"
    )
