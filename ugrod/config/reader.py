"""Reading untrusted YAML: a hardened SafeLoader and a value reader that collects problems.

``parse_yaml`` turns text into plain data, refusing what a config file never
needs and an attacker would use: tags (``!!python/object``), duplicate keys
(safe_load keeps the last silently), more than 1 MiB, deep nesting, alias
bombs and alias cycles, bytes that are not UTF-8. ``Reader`` then checks
values one at a time, recording each problem under its key path instead of
stopping at the first; ``sections.py`` walks the schema (``schema.py``) with it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import yaml

from ugrod.config.paths import expand_user_path

MAX_BYTES: Final = 1 << 20          # a cluster.yaml is a few KB; anything near this is hostile
MAX_DEPTH: Final = 32               # the schema is 5 levels deep
MAX_EXPANDED_NODES: Final = 100_000  # YAML nodes after alias expansion (billion laughs)
MAX_INT: Final = 1 << 31

# ---- errors ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong: ``where`` is a key path (``nodes.gpu1.vram_gb``), a line, or ""."""

    where: str
    problem: str


class ConfigError(Exception):
    """Everything wrong with one config file; ``str()`` is one line per problem."""

    def __init__(self, path: str | os.PathLike[str], problems: Sequence[Problem]) -> None:
        self.path = os.fspath(path)
        self.problems = list(problems)
        super().__init__(self.path, self.problems)

    @property
    def where(self) -> str:
        return self.problems[0].where if self.problems else ""

    @property
    def problem(self) -> str:
        return self.problems[0].problem if self.problems else ""

    def lines(self) -> list[str]:
        return [f"{self.path}: {p.where}: {p.problem}" if p.where else f"{self.path}: {p.problem}"
                for p in self.problems]

    def __str__(self) -> str:
        return "\n".join(self.lines())



# ---- the hardened YAML loader ----------------------------------------------


class Refused(Exception):
    """The text is not a YAML document we read at all: one problem, no values."""

    def __init__(self, where: yaml.Mark | str | None, problem: str) -> None:
        super().__init__(problem)
        self.where = where if isinstance(where, str) else at_mark(where)
        self.problem = problem


# YAML 1.2 floats: PyYAML (1.1) reads `lr: 2e-4` as the string '2e-4'.
_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses tags and duplicate keys and bounds nesting."""

    def __init__(self, stream: str, what: str = "cluster.yaml") -> None:
        super().__init__(stream)
        self.duplicates: list[Problem] = []
        self._depth = 0
        self.what = what

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        # The composer recurses once per level: stop long before Python's stack does.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise Refused(self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                               f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode,
                          deep: bool = False) -> dict[Any, Any]:
        # safe_load keeps the last of two equal keys silently; a typo'd copy-paste
        # then changes a node's address without a word. Merge keys (<<) may override.
        first: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            if key in first:
                self.duplicates.append(Problem(
                    at_mark(key_node.start_mark),
                    f"duplicate key {show(key)} (first on line {first[key].line + 1})"))
            else:
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep)

    def _refuse_tag(self, node: yaml.Node) -> NoReturn:
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise Refused(node.start_mark, f"tag {show(tag)} is not allowed: {self.what} is "
                                        f"plain YAML (mappings, lists, strings, numbers)")


_Loader.add_constructor(None, _Loader._refuse_tag)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789"))


def at_mark(mark: yaml.Mark | None) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _line_of(where: str) -> int:
    m = re.match(r"line (\d+)", where)
    return int(m.group(1)) if m else 0


def _check_graph(root: yaml.Node) -> None:
    """Refuse alias cycles, and documents whose alias expansion is too big or too deep."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        kids: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            kids = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            kids = [n for pair in node.value for n in pair]
        if done:
            on_stack.discard(key)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[key] > MAX_EXPANDED_NODES:
                raise Refused(node.start_mark, f"aliases expand to more than "
                                                f"{MAX_EXPANDED_NODES} values")
            if depth[key] > MAX_DEPTH:
                raise Refused(node.start_mark, f"aliases nest more than {MAX_DEPTH} "
                                                f"levels deep")
            continue
        if key in size:
            continue
        if key in on_stack:
            raise Refused(node.start_mark, "an alias refers to a value that contains it")
        on_stack.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in size)


def parse_yaml(data: str | bytes, what: str = "cluster.yaml",
               text_lists: frozenset[str] = frozenset()) -> tuple[Any, list[Problem]]:
    """Plain data from YAML text, plus duplicate-key problems; raises Refused.

    The one hardened reader of every YAML file UGRO reads: ugrod's cluster.yaml and
    ``ugroctl``'s job files (``what`` names the kind of file in messages). The scalars
    of a list under a top-level key in ``text_lists`` are kept as written (a command's
    ``--lr 2e-4`` stays ``'2e-4'``, not ``'0.0002'``).
    """
    if isinstance(data, bytes):
        if len(data) > MAX_BYTES:
            raise Refused(None, f"the file is larger than {MAX_BYTES} bytes (1 MiB)")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[:exc.start].count(b"\n") + 1
            raise Refused(f"line {line}", f"not UTF-8 text (byte 0x{data[exc.start]:02x} "
                                 f"at offset {exc.start})") from None
    else:
        if len(data) > MAX_BYTES:
            raise Refused(None, f"the file is larger than {MAX_BYTES} bytes (1 MiB)")
        text = data.removeprefix("\ufeff")
    loader: _Loader | None = None
    try:
        loader = _Loader(text, what)
        node = loader.get_single_node()
        if node is None:
            return None, []
        _check_graph(node)
        if text_lists and isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value in text_lists \
                        and isinstance(value_node, yaml.SequenceNode):
                    for item in value_node.value:
                        if isinstance(item, yaml.ScalarNode) and not item.tag.endswith(":null"):
                            item.tag = "tag:yaml.org,2002:str"
        data = loader.construct_document(node)
        return data, sorted(loader.duplicates, key=lambda p: _line_of(p.where))
    except yaml.reader.ReaderError as exc:
        pos = exc.position
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1])
        raise Refused(f"line {line}, column {col}", f"character U+{char:04X} is not "
                             f"allowed in YAML") from None
    except yaml.MarkedYAMLError as exc:
        problem = exc.problem or "invalid YAML"
        if exc.context:
            problem = (f"{exc.context}, {problem}" if problem.startswith("but ")
                       else f"{problem} ({exc.context})")
        raise Refused(exc.problem_mark or exc.context_mark, f"invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise Refused(None, f"invalid YAML: {exc}") from None
    except RecursionError:
        raise Refused(None, "nested too deeply") from None
    except (ValueError, OverflowError) as exc:
        # Constructors' own errors: a 5000-digit integer, a date like 2024-13-45.
        raise Refused(None, f"invalid YAML value: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()


# ---- reading values ---------------------------------------------------------

T = TypeVar("T")
_MISSING: Final[Any] = object()


class Bad(Exception):
    """One value's problem; the reader records it under the value's key path."""


class Reported(Bad):
    """A value whose problems were already recorded (inside it): nothing more to say."""


def show(value: Any) -> str:
    """A value as a person should see it in a message, long strings shortened."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else f"{value[:40]!r}... ({len(value)} characters)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
        text = repr(value)
        return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} digits)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _key(key: str) -> str:
    return key if len(key) <= 40 else f"{key[:40]}..."


def join_key(parent: str, key: str) -> str:
    return f"{parent}.{_key(key)}" if parent else _key(key)


def _is_host(text: str) -> bool:
    import ipaddress  # here: ugroctl's job files import this module and never need it

    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    labels = text.split(".")
    if len(text) > 253 or labels[-1].isdigit():  # '192.168.1.300' is a bad IP, not a name
        return False
    return all(re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", lb)
               for lb in labels)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _number_phrase(lo: float, strict: bool, integer: bool) -> str:
    what = "integer" if integer else "number"
    if lo == 0 and strict:
        return f"a positive {what}"
    if lo == 0:
        return f"a non-negative {what}"
    return f"{'an' if integer else 'a'} {what} of at least {_num(lo)}"


class Reader:
    """Walks the parsed YAML, collecting problems instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str], base_dir: Path | None) -> None:
        self.env = env
        self.base_dir = base_dir
        self.problems: list[Problem] = []

    def fail(self, where: str, problem: str) -> None:
        self.problems.append(Problem(where, problem))

    # -- structure --

    def section(self, value: Any, where: str, allowed: Iterable[str], what: str = "a mapping",
                none_ok: bool = False) -> dict[str, Any] | None:
        """A mapping with only ``allowed`` keys (unknown ones reported); None if not a mapping.

        ``none_ok``: an empty value (``training:`` with nothing under it) is an empty mapping.
        """
        if value is None and none_ok:
            return {}
        if not isinstance(value, dict):
            self.fail(where, f"expected {what}, got {show(value)}")
            return None
        allowed = tuple(allowed)
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.fail(where, f"keys must be strings, got {show(key)}")
            elif key in allowed:
                out[key] = item
            else:
                import difflib  # only for a misspelt key

                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = (f"did you mean {close[0]!r}?" if close
                        else "expected one of: " + ", ".join(sorted(allowed)))
                self.fail(join_key(where, key), f"unknown key; {hint}")
        return out

    def get(self, m: Mapping[str, Any], parent: str, key: str,
            check: Callable[[Any, str], T], default: Any = _MISSING) -> Any:
        """``check(m[key])``, or ``default`` when the key is absent or its value is bad."""
        if key not in m:
            return None if default is _MISSING else default
        where = join_key(parent, key)
        try:
            return check(m[key], where)
        except Reported:
            return None if default is _MISSING else default
        except Bad as exc:
            self.fail(where, str(exc))
            return None if default is _MISSING else default

    # -- environment expansion --

    def expand(self, text: str) -> str:
        """${VAR}, ${VAR:-default} and $VAR from the environment; $$ is a literal $."""
        if "$" not in text:
            return text
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            c = text[i]
            if c != "$":
                j = text.find("$", i)
                j = n if j < 0 else j
                out.append(text[i:j])
                i = j
                continue
            nxt = text[i + 1] if i + 1 < n else ""
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "{":
                end = text.find("}", i + 2)
                if end < 0:
                    raise Bad(f"unterminated '${{' in {show(text)}")
                body = text[i + 2:end]
                name, sep, fallback = body.partition(":-")
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                    raise Bad(f"bad variable reference {show('${' + body + '}')}: expected "
                               f"${{NAME}} or ${{NAME:-default}} ('$$' is a literal '$')")
                i = end + 1
            else:
                m = re.compile(r"[A-Za-z_][A-Za-z0-9_]*").match(text, i + 1)
                if m is None:
                    raise Bad("'$' must be followed by a variable name or '{NAME}' "
                               "(write '$$' for a literal '$')")
                name, sep, fallback = m.group(), "", ""
                i = m.end()
            value = self.env.get(name)
            if value is None or (sep and value == ""):
                if not sep:
                    raise Bad(f"environment variable {name} is not set")
                value = fallback
            out.append(value)
        return "".join(out)

    def _env_scalar(self, value: Any) -> Any:
        """A number or boolean written as ``${VAR}``: expanded and parsed."""
        if not isinstance(value, str) or "$" not in value:
            return value
        text = self.expand(value).strip()
        if len(text) > 64:
            return text
        if re.fullmatch(r"[-+]?[0-9]+", text):
            return int(text)
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        try:
            return float(text)
        except ValueError:
            return text

    # -- checkers: (value, where) -> typed value, raising Bad --

    def text(self, value: Any, where: str = "") -> str:
        if not isinstance(value, str):
            raise Bad(f"expected a string, got {show(value)}")
        out = self.expand(value)
        if not out.strip():
            raise Bad("expected a non-empty string")
        if "\x00" in out or len(out) > 4096:
            raise Bad(f"expected a string without NUL of at most 4096 characters, "
                       f"got {show(out)}")
        return out

    def matching(self, pattern: re.Pattern[str], what: str) -> Callable[[Any, str], str]:
        def check(value: Any, where: str) -> str:
            out = self.text(value, where)
            if not pattern.fullmatch(out):
                raise Bad(f"expected {what}, got {show(out)}")
            return out
        return check

    def choice(self, *options: str) -> Callable[[Any, str], str]:
        def check(value: Any, where: str) -> str:
            out = self.text(value, where) if isinstance(value, str) else value
            if out not in options:
                said = " or ".join(repr(o) for o in options)
                raise Bad(f"expected {said}, got {show(out)}")
            return str(out)
        return check

    def host(self, value: Any, where: str = "") -> str:
        out = self.text(value, where)
        if not _is_host(out):
            raise Bad(f"expected an IP address or a hostname, got {show(out)}")
        return out

    def integer(self, lo: int = 0, hi: int = MAX_INT, *, strict: bool = False,
                phrase: str | None = None) -> Callable[[Any, str], int]:
        """Integers >= lo (> lo when strict) and <= hi; a bool is not an integer."""
        said = phrase or _number_phrase(lo, strict, integer=True)

        def check(value: Any, where: str) -> int:
            value = self._env_scalar(value)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo or (
                    strict and value == lo):
                raise Bad(f"expected {said}, got {show(value)}")
            if value > hi:
                raise Bad(f"expected {said}" + ("" if phrase else f" no larger than {hi}")
                           + f", got {show(value)}")
            return value
        return check

    def number(self, lo: float = 0, hi: float = 1e9, *, strict: bool = False,
               phrase: str | None = None) -> Callable[[Any, str], float]:
        """Finite numbers >= lo (> lo when strict) and <= hi, returned as float."""
        said = phrase or _number_phrase(lo, strict, integer=False)

        def check(value: Any, where: str) -> float:
            value = self._env_scalar(value)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or value < lo or (strict and value == lo)):
                raise Bad(f"expected {said}, got {show(value)}")
            if value > hi:
                raise Bad(f"expected {said}" + ("" if phrase else f" no larger than {_num(hi)}")
                           + f", got {show(value)}")
            return float(value)
        return check

    def boolean(self, value: Any, where: str = "") -> bool:
        value = self._env_scalar(value)
        if not isinstance(value, bool):
            raise Bad(f"expected true or false, got {show(value)}")
        return value

    def local_path(self, value: Any, where: str = "") -> Path:
        """A path on the head node: ~ and relative paths resolved here."""
        try:
            return expand_user_path(self.text(value, where), self.env, self.base_dir)
        except ValueError as exc:
            raise Bad(str(exc)) from None

    def node_path(self, value: Any, where: str = "") -> str:
        """A path on a node: kept as written (~ is that node's home), absolute or ~/..."""
        out = self.text(value, where)
        if not (out.startswith("/") or out == "~" or out.startswith("~/")):
            raise Bad(f"expected an absolute path or one starting with ~/, got {show(out)}")
        return out

    def items(self, value: Any, where: str, check: Callable[[Any, str], T],
              what: str = "a list") -> list[T]:
        """Each element checked; bad ones reported as ``where[i]`` and dropped."""
        if not isinstance(value, list):
            raise Bad(f"expected {what}, got {show(value)}")
        out: list[T] = []
        for i, item in enumerate(value):
            try:
                out.append(check(item, f"{where}[{i}]"))
            except Reported:
                pass
            except Bad as exc:
                self.fail(f"{where}[{i}]", str(exc))
        return out

