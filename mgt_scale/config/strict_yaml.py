# YAML loading for configs: yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps
# the last one silently, so a forgotten second `lr:` would win unseen) and reports every error on one
# line, with the line and column of a syntax error, or the dotted key and both lines of a duplicate.
from __future__ import annotations

from typing import Any

import yaml

MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictYAMLError(ValueError):
    """A one-line description of the problem; the caller prefixes the file (or `--set`) it came from."""


def _refuse_duplicates(node: yaml.Node, path: str, seen: set) -> None:
    """Raise for a key given twice in one mapping. Merge keys (`<<: *anchor`) are not duplicates: the
    explicit keys beside them are meant to win."""
    if id(node) in seen:  # an alias: already walked (and a recursive anchor must not loop)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for k, v in node.value:
            key = path
            if isinstance(k, yaml.ScalarNode) and k.tag != MERGE_TAG:
                key = f"{path}.{k.value}" if path else k.value
                if k.value in lines:
                    raise StrictYAMLError(f"{key}: duplicate key at lines {lines[k.value]} and "
                                          f"{k.start_mark.line + 1} (YAML would keep only the last): remove one")
                lines[k.value] = k.start_mark.line + 1
            _refuse_duplicates(v, key, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _refuse_duplicates(v, f"{path}[{i}]", seen)


def load(text: str, path: str = "") -> Any:
    """Parse one YAML document like yaml.safe_load; `path` is the dotted key the text sits under (for
    a `--set train={...}` value), used in the name of a duplicate key. Raises StrictYAMLError."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicates(node, path, set())
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        m, c = e.problem_mark, e.context_mark
        at = f"line {m.line + 1}, column {m.column + 1}: " if m else ""
        ctx = f" ({e.context} at line {c.line + 1}, column {c.column + 1})" if e.context and c else ""
        raise StrictYAMLError(f"{at}invalid YAML: {e.problem}{ctx}") from None
    except yaml.YAMLError as e:
        raise StrictYAMLError(f"invalid YAML: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()
