"""The template language of generated kernels: a template is the kernel's own source with a few marks.

- A line holding a marker (`@g`, `@s`, ...: the names are the caller's) is repeated once per copy of that marker,
  each copy replacing the marker's keys by its values in order (so a longer key such as `@pi` comes before `@p`).
  A line holding several markers is repeated for each combination.
- `for @k in NAME:` (or `for @k in reversed(NAME):`) opens a block unrolled at generation: its body, indented
  one level deeper, is emitted once per entry of the block list NAME, each entry substituting its names and
  adding its own markers.
- `if $FLAG:` / `elif $FLAG:` / `else:` (with `not` allowed) chooses lines at generation: the body of the first
  true branch is kept, one level shallower. Any other `if` is the kernel's own.
- `$TOKEN` is replaced by its value.
Every name a template uses must be given: an unknown token, flag or block is a CodegenError naming the template
and its line.
"""

from __future__ import annotations

import re
from importlib import resources

# A line marker and the substitutions of each of its copies, in order.
Markers = dict[str, list[dict[str, str]]]
# A block list: per entry, (names substituted in the body, markers the body may use).
Blocks = dict[str, list[tuple[dict[str, str], Markers]]]

_TOKEN = re.compile(r"\$([A-Z][A-Z0-9_]*)")
_END = r":\s*(#.*)?$"  # a directive's line may end in a comment, which is dropped with it
_LOOP = re.compile(r"^( *)for @[a-z]+ in (reversed\()?([A-Z][A-Z0-9_]*)\)?" + _END)
_CONDITION = re.compile(r"^( *)(if|elif) (not )?\$([A-Z][A-Z0-9_]*)" + _END)
_ELSE = re.compile(r"^( *)else" + _END)
_INDENT = 4


class CodegenError(ValueError):
    """Code cannot be generated: a cell's pointwise code is outside what a backend compiles, or a template is
    malformed (the message says which construct, where, and why)."""


def read_template(package: str, name: str) -> str:
    """The text of template file `name` shipped in `package` (e.g. "seqfast.backends.numba.templates")."""
    return resources.files(package).joinpath(name).read_text(encoding="utf-8")


def expand(template: str, *, name: str, markers: Markers | None = None, blocks: Blocks | None = None,
           flags: dict[str, bool] | None = None, tokens: dict[str, str] | None = None) -> str:
    """The template expanded: conditions decided, blocks unrolled, marked lines repeated, then tokens replaced.

    Args:
        template: the template's text.
        name: the template's name, for errors.
        markers: line markers and their copies.
        blocks: the lists `for @k in NAME:` blocks unroll over.
        flags: the values of `if $FLAG:` conditions.
        tokens: the values of `$TOKEN`s.
    Raises:
        CodegenError: a token, flag or block the template names has no value, or a block has no body.
    """
    expander = _Expander(name, markers or {}, blocks or {}, flags or {})
    numbered = list(enumerate(template.splitlines(), start=1))
    text = "\n".join(expander.lines(numbered, expander.markers))
    values = tokens or {}

    def token(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            line = text.count("\n", 0, match.start()) + 1
            raise CodegenError(f"template {name}: token ${key} has no value (line {line} of the expansion; "
                               f"tokens given: {sorted(values)})")
        return values[key]

    return _TOKEN.sub(token, text)


class _Expander:
    def __init__(self, name: str, markers: Markers, blocks: Blocks, flags: dict[str, bool]) -> None:
        self.name, self.markers, self.blocks, self.flags = name, markers, blocks, flags

    def error(self, number: int, why: str) -> CodegenError:
        return CodegenError(f"template {self.name}, line {number}: {why}")

    def lines(self, numbered: list[tuple[int, str]], markers: Markers) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(numbered):
            number, line = numbered[i]
            loop, condition = _LOOP.match(line), _CONDITION.match(line)
            if loop is None and condition is None:
                out.extend(_repeat(line, markers))
                i += 1
            elif loop is not None:
                body, i = self.body(numbered, i, len(loop.group(1)))
                out.extend(self.unroll(number, loop.group(3), bool(loop.group(2)), body, markers))
            else:
                chosen, i = self.condition(numbered, i, len(condition.group(1)))
                out.extend(self.lines(chosen, markers))
        return out

    def body(self, numbered: list[tuple[int, str]], start: int, indent: int) -> tuple[list[tuple[int, str]], int]:
        """The block opened at line `start` (one level deeper, blank lines included), dedented; and the index
        after it."""
        deeper = " " * (indent + _INDENT)
        i = start + 1
        body = []
        while i < len(numbered) and (numbered[i][1].startswith(deeper) or not numbered[i][1].strip()):
            body.append((numbered[i][0], numbered[i][1][_INDENT:]))
            i += 1
        while body and not body[-1][1].strip():  # trailing blank lines belong to what follows
            body.pop()
            i -= 1
        if not body:
            raise self.error(numbered[start][0], f"{numbered[start][1].strip()!r} has no indented body")
        return body, i

    def condition(self, numbered: list[tuple[int, str]], start: int, indent: int
                  ) -> tuple[list[tuple[int, str]], int]:
        """The body of the first true branch of the if / elif / else chain at `start` (none true: no lines), and
        the index after the chain."""
        chosen: list[tuple[int, str]] | None = None
        i = start
        while True:
            number, line = numbered[i]
            branch = _CONDITION.match(line)
            body, i = self.body(numbered, i, indent)
            if branch is None:  # else
                value = True
            else:
                flag = branch.group(4)
                if flag not in self.flags:
                    raise self.error(number, f"flag ${flag} has no value (flags given: {sorted(self.flags)})")
                value = self.flags[flag] != bool(branch.group(3))
            if chosen is None and value:
                chosen = body
            if branch is None or i >= len(numbered):
                break
            follow = numbered[i][1]
            more = _CONDITION.match(follow) or _ELSE.match(follow)
            if more is None or len(more.group(1)) != indent or follow.lstrip().startswith("if "):
                break
        return chosen or [], i

    def unroll(self, number: int, block: str, backwards: bool, body: list[tuple[int, str]], markers: Markers
               ) -> list[str]:
        if block not in self.blocks:
            raise self.error(number, f"block list {block} has no value (blocks given: {sorted(self.blocks)})")
        entries = self.blocks[block][::-1] if backwards else self.blocks[block]
        out: list[str] = []
        for names, entry_markers in entries:
            renamed = []
            for n, line in body:
                for key, value in names.items():
                    line = line.replace(key, value)
                renamed.append((n, line))
            out.extend(self.lines(renamed, {**markers, **entry_markers}))
        return out


def _repeat(line: str, markers: Markers) -> list[str]:
    """`line` once per combination of the markers it holds (none: the line itself)."""
    for marker, copies in markers.items():
        if marker in line:
            out = []
            for subs in copies:
                text = line
                for key, value in subs.items():
                    text = text.replace(key, value)
                out.extend(_repeat(text, markers))
            return out
    return [line]


__all__ = ["CodegenError", "Markers", "Blocks", "expand", "read_template"]
