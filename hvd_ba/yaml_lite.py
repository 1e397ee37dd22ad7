"""PyYAML when it is installed; otherwise a reader of the small subset our presets use.

Why: `cluster/gpu_check.sh` must run on a GPU machine that has only torch and torchvision (no
PyYAML, no internet). The presets are two-level mappings of scalars and flow lists
(`key: value  # comment`, `scale: [0.25, 1.0]`, `base: resnet50`), which this reads exactly as
PyYAML's safe_load does; anything else raises ValueError naming the line. Writing falls back to
JSON, which is YAML too.
"""
from __future__ import annotations

import json
import re

try:
    import yaml as _yaml
except ImportError:  # pragma: no cover - exercised by the GPU check's environment (and a test)
    _yaml = None

YAMLError = _yaml.YAMLError if _yaml else ValueError

_FLOAT = re.compile(r"^[-+]?(\d+\.\d*|\.\d+)([eE][-+]\d+)?$")  # YAML 1.1: a dot, a signed exponent


def scalar(text: str):
    """A plain YAML 1.1 scalar or flow list, as safe_load reads the ones our presets use."""
    text = text.strip()
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE"):
        return True
    if text in ("false", "False", "FALSE"):
        return False
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [scalar(part) for part in inner.split(",")] if inner else []
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    if _FLOAT.match(text):  # '1e-4' (no dot) and '1.5e3' (unsigned exponent) stay strings
        return float(text)
    return text


def _strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"":
            quote = None if quote == ch else (quote or ch)
        elif ch == "#" and quote is None and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def _lite_load(text: str):
    if text.lstrip().startswith("{"):  # what safe_dump writes without PyYAML (JSON is YAML)
        return json.loads(text)
    root: dict = {}
    section = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).rstrip()
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        key, sep, value = line.strip().partition(":")
        if not sep or not key:
            raise ValueError(f"line {number}: {raw.strip()!r} is not 'key: value'")
        if indent == 0:
            if value.strip():
                root[key] = scalar(value)
                section = None
            else:
                section = root.setdefault(key, {})
        elif section is not None:
            section[key] = scalar(value)
        else:
            raise ValueError(f"line {number}: indented {raw.strip()!r} outside a section")
    return root


def safe_load(text: str):
    if _yaml is not None:
        return _yaml.safe_load(text)
    return _lite_load(text) if "\n" in text.strip() or text.lstrip().startswith("{") else scalar(text)


def safe_dump(data, sort_keys: bool = False) -> str:
    if _yaml is not None:
        return _yaml.safe_dump(data, sort_keys=sort_keys)
    return json.dumps(data, indent=1, sort_keys=sort_keys) + "\n"
