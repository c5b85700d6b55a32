"""YAML from people and the web, read with limits: a config is a few kilobytes of plain mappings and lists.

PyYAML's safe loader runs no code, but it still lets a duplicated key win silently (two `base_model:` lines),
expands aliases without bound (a "billion laughs" file of a few hundred bytes becomes gigabytes and hangs the
validator), recurses once per nesting level (50,000 nested lists end in RecursionError) and quotes its input in
error messages. Here each of these is a named error that quotes at most a short excerpt.
"""

from __future__ import annotations

from typing import Any

import yaml

from studio.errors import StudioError

MAX_BYTES = 4 * 2**20  # far above any real config (the zoo's, with its prompts, is 13 kB)
MAX_DEPTH = 64  # a config nests four levels: config, experts, expert, prompts
MAX_ALIASES = 1000
MAX_NODES = 200_000  # every value after aliases are expanded
EXCERPT = 60


def excerpt(value: Any, limit: int = EXCERPT) -> str:
    """A short, one-line quote of a value for an error message: never the whole (maybe huge) input."""
    return shorten(repr(value), limit)


def shorten(text: str, limit: int = EXCERPT) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


class _Loader(yaml.SafeLoader):
    """The safe loader, counting nesting depth and aliases as it composes, refusing duplicate keys."""

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self.source, self.depth, self.aliases = source, 0, 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise StudioError(f"{self.source} uses more than {MAX_ALIASES} aliases (`*name`); a config needs few, "
                                  f"if any. Write the values out.")
            return super().compose_node(parent, index)
        self.depth += 1
        if self.depth > MAX_DEPTH:
            line = self.peek_event().start_mark.line + 1
            raise StudioError(f"{self.source} nests lists or mappings more than {MAX_DEPTH} levels deep (line "
                              f"{line}); a config nests four. Check the brackets and the indentation.")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node, self.source)
        return node

    def construct_mapping(self, node, deep=False):
        seen: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
            if key in seen:
                raise StudioError(f"{self.source}: key `{excerpt(key_node.value, 40)[1:-1]}` appears twice in the same "
                                  f"mapping, on line {seen[key]} and on line {line}. YAML would silently keep the "
                                  f"last one; delete the one you do not mean.")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expanded_size(root, source: str) -> None:
    """Count the values the document holds once every alias is expanded, without expanding anything (each node
    is sized once); refuse alias bombs and self-referencing aliases."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            on_path.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in _children(node))
            if size[id(node)] > MAX_NODES:
                raise StudioError(f"{source} expands to more than {MAX_NODES:,} values once its aliases (`*name`) "
                                  f"are replaced by what they name (line {node.start_mark.line + 1}): an alias bomb, "
                                  f"or a config far larger than any real one.")
            continue
        if id(node) in size:
            continue
        on_path.add(id(node))
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise StudioError(f"{source}: an alias refers to a value that contains it (line "
                                  f"{child.start_mark.line + 1}), which would be infinite. Write the value out.")
            if id(child) not in size:
                stack.append((child, False))


def load(text: str, source: str = "config", invalid: str = "is not valid YAML") -> Any:
    """Parse YAML text with the limits above; any problem is one StudioError that quotes at most an excerpt.
    `invalid` follows `source` in the message for text that is not YAML at all."""
    if len(text) > MAX_BYTES:
        raise StudioError(f"{source} is {len(text):,} characters long; a config is at most {MAX_BYTES:,}. Is it the "
                          f"right file?")
    loader = _Loader(text, source)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        message = " ".join(str(exc).split())
        if len(message) > 300:
            message = message[:300] + " [...]"
        raise StudioError(f"{source} {invalid}: {message}") from None
    except RecursionError:
        raise StudioError(f"{source} nests values too deeply to read; a config nests four levels.") from None
    finally:
        loader.dispose()


def decode(data: bytes, source: str) -> str:
    """A config file's text; bytes that are not UTF-8 are a named error, with where the first bad byte is."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise StudioError(f"{source} is not UTF-8 text: byte {data[exc.start]:#04x} on line {line} cannot be read. "
                          f"Save the file as UTF-8.") from None
