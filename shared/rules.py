"""Business rules loaded from deploy/config/rules.yaml, overridable by environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from shared.errors import ConfigError

DEFAULT_RULES_PATH = Path(__file__).resolve().parent.parent / "deploy" / "config" / "rules.yaml"
ENV_PREFIX = "OMNICRM_RULE__"


def load_rules(path: str | os.PathLike[str] | None = None,
               environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read the rules file and apply `OMNICRM_RULE__SECTION__KEY=value` overrides."""
    environ = os.environ if environ is None else environ
    rules_path = Path(path or environ.get("OMNICRM_RULES") or DEFAULT_RULES_PATH)
    try:
        rules = yaml.safe_load(rules_path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise ConfigError("OMNICRM_RULES", f"rules file {rules_path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ConfigError("OMNICRM_RULES", f"rules file {rules_path} is not valid YAML: {exc}") from exc
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        if not parts:
            continue
        node = rules
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(name, f"{'.'.join(parts)} does not name a rules setting")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(name, f"value is not valid YAML: {exc}") from exc
        node[parts[-1]] = value
    return rules
