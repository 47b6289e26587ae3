"""The shipped example configs: all of them load, and factory-line.yaml shows every key the daemon reads.

factory-line.yaml is the reference an operator copies from; a key added to
visiond/config.py but not to it is a setting nobody finds.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from visiond.config import Config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PLACEHOLDER = re.compile(r"\$\{(VISIOND_[A-Z0-9_]+)")


def _nested_model(annotation) -> tuple[type[BaseModel] | None, bool]:
    """The pydantic model a field holds, if any, and whether it holds a list of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _nested_model(args[0])
    if origin is list:
        model, _ = _nested_model(args[0])
        return model, model is not None
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            model, is_list = _nested_model(arg)
            if model is not None:
                return model, is_list
    return None, False


def missing_keys(model: type[BaseModel], raw, path: str = "") -> list[str]:
    """Key paths of `model` (recursively) absent from the parsed YAML `raw`; a list item model's key
    counts as shown when any item of the list has it (written `cameras[].name`)."""
    missing = []
    for name, field in model.model_fields.items():
        if (field.description or "").startswith("Deprecated"):
            continue  # kept working for old configs, not shown in the examples
        key = field.alias or name
        where = f"{path}.{key}" if path else key
        if not isinstance(raw, dict) or key not in raw:
            missing.append(where)
            continue
        nested, is_list = _nested_model(field.annotation)
        if nested is None:
            continue
        if not is_list:
            missing += missing_keys(nested, raw[key], where)
            continue
        items = [item for item in raw[key] or [] if isinstance(item, dict)] or [{}]
        per_item = [missing_keys(nested, item, f"{where}[]") for item in items]
        candidates = dict.fromkeys(k for item_missing in per_item for k in item_missing)
        missing += [k for k in candidates if all(_lacks(item_missing, k) for item_missing in per_item)]
    return missing


def _lacks(missing: list[str], key: str) -> bool:
    """Whether `key` is missing: listed itself, or under a listed key (`a.b` lacks `a.b.c`)."""
    return any(key == m or key.startswith((m + ".", m + "[]")) for m in missing)


def _factory_line() -> dict:
    return yaml.safe_load((CONFIGS / "factory-line.yaml").read_text())


def test_factory_line_example_shows_every_config_key():
    # given the reference example and the config models the daemon validates against
    # when every field of every model (nested ones and list items included) is looked up in it
    missing = missing_keys(Config, _factory_line())
    # then none is missing
    assert not missing, f"configs/factory-line.yaml lacks: {', '.join(missing)}"


@pytest.mark.parametrize("remove,expected", [
    (lambda raw: raw.pop("jsonl"), "jsonl"),
    (lambda raw: raw["mqtt"]["tls"].pop("insecure"), "mqtt.tls.insecure"),
    (lambda raw: raw["logging"].pop("json"), "logging.json"),
    (lambda raw: [camera.pop("read_timeout_s", None) for camera in raw["cameras"]], "cameras[].read_timeout_s"),
    (lambda raw: raw["cameras"][0]["capture"].pop("dedupe_bits"), "cameras[].capture.dedupe_bits"),
])
def test_the_key_walk_names_a_removed_key(remove, expected):
    # given the reference example with one key taken out
    raw = _factory_line()
    remove(raw)
    # when its keys are checked
    # then exactly that key's path is reported
    assert missing_keys(Config, raw) == [expected]


def test_every_shipped_config_loads():
    # given every configs/*.yaml, with each ${VISIOND_...} placeholder it uses set in the environment
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert len(paths) >= 2, paths
    for path in paths:
        env = {name: "x" for name in PLACEHOLDER.findall(path.read_text())}
        # when it is loaded as the daemon loads it
        cfg = load_config(path, env=env)
        # then it is a valid config with at least one camera
        assert cfg.cameras, path
