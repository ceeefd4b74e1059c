"""Config loading shared by every stage: a dataclass schema, a YAML file, then `key=value` overrides.

Validation happens here, before any work starts. OmegaConf's structured configs reject unknown keys and
wrong types; each schema's `validate()` checks ranges and relations. Every failure becomes a `ConfigError`
that names the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .files import write_atomic

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value that cannot be used."""


def _closest(key: str, known: list[str]) -> str:
    near = difflib.get_close_matches(key, known, n=3)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def _known_keys(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def _check_keys(raw: dict, schema: type, where: str) -> None:
    """Unknown keys fail with the closest known names; a key listed in the schema's `RENAMED` class attribute
    ({old: new}) fails naming its new name."""
    known = _known_keys(schema)
    renamed = getattr(schema, "RENAMED", {})
    for key in raw:
        if key in renamed:
            raise ConfigError(f"{where}: key '{key}' was renamed to '{renamed[key]}' (docs/configs.md)")
        if key not in known:
            raise ConfigError(
                f"{where}: unknown key '{key}'{_closest(str(key), known)}; known keys: {', '.join(known)}"
            )


def _unbool(tree: dict, schema: type) -> None:
    """YAML reads `no`/`off` as false and `yes`/`on` as true; a key declared `str` gets the word back (as
    `no`/`yes`), so `mixed_precision=no` means the string "no" and not "False"."""
    text_keys = {f.name for f in dataclasses.fields(schema) if f.type in ("str", str)}
    for key, value in tree.items():
        if key in text_keys and isinstance(value, bool):
            tree[key] = "yes" if value else "no"


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Parse `key=value` strings (values in YAML syntax, so `image_size=[256,512]` is a list)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            out[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': value '{text}' is not valid YAML ({err})") from None
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a mapping")
    node[parts[-1]] = value


def _through_list(config: Any, dotted: str) -> bool:
    """Whether the dotted key passes through a list of `config` (its next part must then be an index)."""
    node = config
    for part in dotted.split(".")[:-1]:
        if OmegaConf.is_list(node):
            return True
        if not OmegaConf.is_dict(node) or part not in node:
            return False
        node = node[part]
    return OmegaConf.is_list(node)


def _set_indexed(config: Any, dotted: str, value: Any) -> None:
    """Set a dotted key that indexes into a list (`finetune.0.overrides.lr`), naming the list's length when the
    index is not one of its items."""
    node, parts = config, dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        if OmegaConf.is_list(node):
            if not part.isdigit() or int(part) >= len(node):
                where = ".".join(parts[:i])
                raise ConfigError(f"override '{dotted}': '{where}' is a list of {len(node)} item(s), so the part "
                                  f"after it must be an index from 0 to {len(node) - 1}, not '{part}'")
            node = node[int(part)]
        elif OmegaConf.is_dict(node) and part in node:
            node = node[part]
        else:
            break
    OmegaConf.update(config, dotted, value, merge=True)


def _replace_maps(node: Any, raw: dict) -> None:
    """Let a mapping given in a file or an override replace the default mapping instead of merging into it
    (a config that lists `surfaces: {metal: 1}` means metal only, not metal plus every default)."""
    for key, value in raw.items():
        if isinstance(value, dict) and OmegaConf.is_dict(node.get(key)):
            OmegaConf.update(node, key, {}, merge=False)


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | dict | None = None) -> T:
    """Build a validated `schema` instance from defaults, an optional YAML file and overrides."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of keys, found {type(loaded).__name__}")
        raw = loaded
    _check_keys(raw, schema, where)
    over = dict(overrides) if isinstance(overrides, dict) else parse_overrides(list(overrides or []))
    _unbool(raw, schema)
    _unbool(over, schema)
    for key in over:
        _check_keys({key.split(".")[0]: None}, schema, "override")
    try:
        merged = OmegaConf.structured(schema)
        _replace_maps(merged, raw)
        merged = OmegaConf.merge(merged, OmegaConf.create(raw))
        where = "override"
        _replace_maps(merged, {k: v for k, v in over.items() if "." not in k})
        over_tree: dict[str, Any] = {}
        for key, value in over.items():
            if _through_list(merged, key):  # `finetune.0.overrides.lr=...`: an item of a list, by its index
                _set_indexed(merged, key, value)
            else:
                _set_dotted(over_tree, key, value)
        merged = OmegaConf.merge(merged, OmegaConf.create(over_tree))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
        msg = str(err).splitlines()[0]
        raise ConfigError(f"{where}: key '{key}': {msg}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(config: Any) -> dict:
    """A plain, YAML/JSON-serialisable dict of a config dataclass."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config next to a run's outputs (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def section(config: Any, schema: type[T]) -> T:
    """The `schema` dataclass built from the same-named fields of `config` (a config that inherits a section's
    keys, such as `PretrainConfig` the `MixConfig` keys, hands that section to the code that owns it)."""
    return schema(**{f.name: getattr(config, f.name) for f in dataclasses.fields(schema)})


def require(cond: bool, key: str, value: Any, expected: str) -> None:
    """Raise a ConfigError naming key, value and expectation unless `cond` holds."""
    if not cond:
        raise ConfigError(f"key '{key}': value {value!r} is invalid, expected {expected}")


def _field_notes(schema: type) -> dict[str, tuple[str, str]]:
    """{key: (class that declares it, its trailing comment)} from the source of `schema` and its bases."""
    import inspect
    import re

    notes: dict[str, tuple[str, str]] = {}
    for cls in reversed(schema.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            match = re.match(r"^    (\w+): [^=]+?(?:= .*?)?(?:  # (.*))?$", line)
            if match and match.group(1) in cls.__annotations__:
                key, comment = match.group(1), match.group(2) or ""
                notes[key] = (f"{cls.__module__}.{cls.__name__}", notes.get(key, ("", ""))[1] or comment)
    return notes


def _declaring(schema: type, key: str) -> list[str]:
    """Every class of `schema`'s bases that declares `key` (the base, then each class that changes its default)."""
    return [f"{c.__module__}.{c.__name__}" for c in reversed(schema.__mro__)
            if key in getattr(c, "__annotations__", {})]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def key_table(schemas: dict[str, type]) -> str:
    """A Markdown table of every key of `schemas` ({command: schema}), each key once: its default per command
    (one value when all agree), the commands that read it, where it is declared and what it means.

    Lines of a key that a schema renamed (`RENAMED`) follow the table."""
    rows: dict[str, dict] = {}
    for command, schema in schemas.items():
        notes = _field_notes(schema)
        for f in dataclasses.fields(schema):
            row = rows.setdefault(f.name, {"defaults": {}, "declared": set(), "note": ""})
            row["defaults"][command] = _default(f)
            declared, note = notes.get(f.name, ("", ""))
            row["declared"].update(c for c in _declaring(schema, f.name) if c)
            row["note"] = row["note"] or note

    def show(value: Any) -> str:
        return "`" + yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip() + "`"

    lines = ["| key | default | read by | declared in | meaning |", "|---|---|---|---|---|"]
    for key in sorted(rows):
        row = rows[key]
        values = {show(v) for v in row["defaults"].values()}
        default = values.pop() if len(values) == 1 else ", ".join(
            f"{show(v)} ({c})" for c, v in row["defaults"].items())
        lines.append(f"| `{key}` | {default} | {', '.join(row['defaults'])} | "
                     f"{', '.join(f'`{d}`' for d in sorted(row['declared']) if d)} | {row['note'].replace('|', '/')} |")
    renamed = [(c, old, new) for c, s in schemas.items() for old, new in getattr(s, "RENAMED", {}).items()]
    if renamed:
        lines += ["", "Renamed keys (a config that still uses one fails naming the new name):", ""]
        lines += [f"- `{old}` -> `{new}` ({c})" for c, old, new in renamed]
    return "\n".join(lines) + "\n"
