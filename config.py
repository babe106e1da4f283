"""Configs: one YAML file in configs/ → nested dataclasses; any field overridable as `--section.field value`.

Each script declares its config as a dataclass of sections (e.g. `model`, `data`, `train`). Values given on the
command line are parsed as YAML (`--train.max_steps 50`, `--data.datasets [shhs,wsc]`, `--data.stride_s null`), then
checked against the field's type. The help text of a field is its trailing comment in the dataclass source, so
`--help` lists every field with its default and meaning without a second copy of the documentation.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from pathlib import Path

import yaml


def field_comments(cls) -> dict[str, str]:
    """{field: trailing '# comment'} from the dataclass source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", source, re.M)}


def describe(config_cls) -> str:
    """Every overridable field, its default and its comment, for --help."""
    lines = []
    for section in dataclasses.fields(config_cls):
        section_cls = section.default_factory().__class__
        comments = field_comments(section_cls)
        for f in dataclasses.fields(section_cls):
            default = getattr(section.default_factory(), f.name)
            option = f"--{section.name}.{f.name} {default!r}"
            lines.append(f"  {option:<40} {comments.get(f.name, '')}")
    return "\n".join(lines)


# Fields that must be above zero, and fractions (probabilities, shares), wherever they appear; every other number
# must not be negative. Checked when the config is built, so a mistake is one line and nothing has been written.
POSITIVE = {"batch_size", "grad_accum", "max_lr", "log_every", "ckpt_every", "window_s", "stride_s", "n_channels",
            "max_nonfinite_steps", "patch_len", "max_patches", "d_model", "n_layers", "n_heads", "d_ff", "hidden_size",
            "n_classes", "patches_per_epoch", "revin_eps"}
FRACTIONS = {"dropout", "linear_dropout", "p_zero", "p_jitter", "mask_ratio", "cutmix_p", "channel_dropout",
             "pct_start"}


def _check_range(value, name: str):
    field = name.split(".")[-1]
    if field in POSITIVE and value <= 0:
        raise SystemExit(f"config: {name} must be above 0, got {value!r}")
    if field in FRACTIONS and not 0 <= value <= 1:
        raise SystemExit(f"config: {name} must be between 0 and 1, got {value!r}")
    if value < 0:
        raise SystemExit(f"config: {name} must not be negative, got {value!r}")
    return value


def coerce(value, annotation: str, name: str):
    """Check a YAML-parsed value against the field's annotation (a string: `from __future__ import annotations`)."""
    kinds = {"int": int, "float": (int, float), "bool": bool, "str": str, "list": (list, tuple)}
    allowed = [k.strip() for k in annotation.replace("Optional[", "").rstrip("]").split("|")]
    if value is None:
        if "None" in allowed:
            return None
        raise SystemExit(f"config: {name} cannot be null")
    if isinstance(value, str) and "float" in allowed:
        try:                 # YAML 1.1 reads 1e-4 (no dot) as a string; people type it on the command line
            value = float(value)
        except ValueError:
            pass
    for kind in allowed:
        base = kind.split("[")[0]
        if base in kinds and isinstance(value, kinds[base]) and not (base in ("int", "float") and isinstance(value, bool)):
            if base in ("int", "float"):
                return _check_range(float(value) if base == "float" else value, name)
            return list(value) if base == "list" else value
    hint = " (YAML reads yes/no/on/off as booleans: quote the word)" if isinstance(value, bool) and "str" in allowed else ""
    raise SystemExit(f"config: {name} must be {annotation}, got {value!r}{hint}")


def build(config_cls, values: dict):
    """Nested dict → config dataclass; unknown sections or fields are errors that list the valid ones."""
    sections = {f.name: f for f in dataclasses.fields(config_cls)}
    kwargs = {}
    for section_name, section_values in (values or {}).items():
        if not isinstance(section_values, (dict, type(None))):
            raise SystemExit(f"config: section {section_name!r} must be a mapping of fields, got {section_values!r}")
        if section_name not in sections:
            raise SystemExit(f"config: unknown section {section_name!r} (sections: {', '.join(sections)})")
        section_cls = sections[section_name].default_factory().__class__
        fields = {f.name: f for f in dataclasses.fields(section_cls)}
        for key in section_values or {}:
            if key not in fields:
                raise SystemExit(f"config: unknown field {section_name}.{key} (fields: {', '.join(fields)})")
        kwargs[section_name] = section_cls(**{
            key: coerce(value, str(fields[key].type), f"{section_name}.{key}")
            for key, value in (section_values or {}).items()})
    return config_cls(**kwargs)


def overrides(extra: list[str]) -> dict:
    """['--a.b', '1', '--c.d', 'x'] → {'a': {'b': 1}, 'c': {'d': 'x'}} (values parsed as YAML)."""
    values, i = {}, 0
    while i < len(extra):
        key = extra[i]
        if not key.startswith("--") or "." not in key:
            raise SystemExit(f"unknown argument {key!r}: config overrides look like --section.field value")
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(extra):
            raw = extra[i + 1]
            i += 2
        else:
            raise SystemExit(f"{key} needs a value")
        section, field = key[2:].split(".", 1)
        try:
            values.setdefault(section, {})[field] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise SystemExit(f"{key}: cannot read the value {raw!r} (values are YAML: 8, 1e-4, [shhs, wsc], null)") from None
    return values


def merge(base: dict, extra: dict) -> dict:
    merged = {k: dict(v or {}) for k, v in (base or {}).items()}
    for section, fields in extra.items():
        merged.setdefault(section, {}).update(fields)
    return merged


def load(config_cls, source: str | Path | dict | None, extra_args: list[str] = ()):
    """A config from a YAML file (or the dict of one, e.g. a run folder's config from runs.read_config), then the
    command-line overrides. The resolved config is saved with every run by runs.save_config."""
    values = source if isinstance(source, dict) else (read_yaml(Path(source)) if source else {})
    return build(config_cls, merge(values, overrides(list(extra_args))))


def read_yaml(path: Path) -> dict:
    """A config file's mapping of sections; one line naming the file for a missing file or a YAML mistake."""
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as err:
        raise SystemExit(f"{path}: cannot read the config ({err.strerror})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SystemExit(f"{path}: not valid YAML{where} ({getattr(err, 'problem', None) or err})") from None
    if values is not None and not isinstance(values, dict):
        raise SystemExit(f"{path}: a config is a mapping of sections (model:, data:, train:, …), got {type(values).__name__}")
    return values or {}


def positive(kind):
    """argparse type for a number above 0 (`--batch-size`, `--stride-s`): a 0 or a negative is one line, not a
    silently empty batch or a traceback later."""
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def non_negative(text: str) -> int:
    """argparse type for a count that may be 0 (`--workers`, `--bootstrap`)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def parser(config_cls, description: str, prog: str) -> argparse.ArgumentParser:
    """An argparse parser whose epilog lists every config field; parse with parse_known_args and pass the rest
    to load()."""
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (default, meaning); override any as --section.field value:\n" + describe(config_cls))
