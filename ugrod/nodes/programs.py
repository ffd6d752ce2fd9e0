"""The programs that run on nodes (``ugrod/nodes/remote/*.py``), as the text that is shipped.

Each is a real file that ruff and mypy check and the tests run. Nothing is installed on a
node, so what a node gets is one self-contained text, run with ``python3 -c TEXT ARGS``
(the probe, the stack dump...) or uploaded (the rank wrapper). Code shared by several
programs lives in library modules there (procscan, host, node_sample); a program imports
from one with a plain line ``from ugrod.nodes.remote.LIB import NAME, ...``, and ``text``
puts the library's code in place of that line (each library once, its own imports of
libraries first, their docstrings left out). Libraries therefore have no ``from
__future__`` import and no main.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

REMOTE = Path(__file__).parent / "remote"
_IMPORT = re.compile(
    r"^from ugrod\.nodes\.remote\.(\w+) import (?:\([^)]*\)|[^\n(]*)\n", re.MULTILINE
)
_DOCSTRING = re.compile(r'"""(?:[^"\\]|\\.|"(?!""))*"""\n')
_FUTURE_OR_MAIN = re.compile(r"^(from __future__ |if __name__ ==)", re.MULTILINE)


@functools.cache
def text(name: str) -> str:
    """The shipped text of ``remote/NAME.py``: its libraries inlined, ugrod not needed."""
    return _inline(_source(name), name, set())


def _source(name: str) -> str:
    return (REMOTE / f"{name}.py").read_text(encoding="utf-8")


def _inline(source: str, name: str, done: set[str]) -> str:
    def library(match: re.Match[str]) -> str:
        lib = match[1]
        if lib in done:
            return ""
        done.add(lib)
        body = _source(lib)
        if _FUTURE_OR_MAIN.search(body):
            raise ValueError(f"remote/{lib}.py is imported by remote/{name}.py, so it is "
                             f"inlined there: it must have no __future__ import and no main")
        # its docstring is for readers of the file: the node is sent the code
        docstring = _DOCSTRING.match(body)
        if docstring is not None:
            body = body[docstring.end():]
        return (f"# ---- ugrod/nodes/remote/{lib}.py, inlined "
                f"(ugrod/nodes/programs.py) ----\n"
                f"{_inline(body, lib, done).strip()}\n"
                f"# ---- end of {lib}.py ----\n")

    return _IMPORT.sub(library, source)
