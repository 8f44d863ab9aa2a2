"""``tunelab serve --config serve.yaml``: the same settings as the command line, in a file.

```yaml
base: tiny:llama                 # optional once backends are given
adapters: {support: runs/support-v1}
backends:
  tuned: {url: http://127.0.0.1:8001/v1, model: support-lora, api_key_env: VLLM_KEY}
  stock: http://127.0.0.1:8002   # shorthand: URL or MODEL@URL
aliases:
  bot: {stock: 0.9, tuned: 0.1}  # the first listed is the baseline
rollouts: {bot: [0.1, 0.5, 1.0]}
policy: {min_samples: 20, max_error_increase: 0.05, max_latency_ratio: 2.0, max_feedback_drop: 0.5}
```

plus any scalar option by its command-line name (``port``, ``request_timeout``, ``max_body_mb``, ...).
Every problem is one line naming the file, the field and the fix.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from tunelab.serve.backends import BackendSpec, normalise_url, parse_backend

# Scalar settings the file may hold (command-line option names, dashes as underscores) and their types.
SCALARS: dict[str, type] = {
    "base": str,
    "host": str,
    "port": int,
    "device": str,
    "dtype": str,
    "queue_size": int,
    "request_timeout": float,
    "max_tokens_limit": int,
    "max_batch": int,
    "rollout_every": int,
    "backend_failures": int,
    "watch_interval": float,
    "log_dir": str,
    "max_body_mb": float,
}
POLICY = {
    "min_samples": int,
    "max_error_increase": float,
    "max_latency_ratio": float,
    "max_feedback_drop": float,
}
MAPPINGS = ("adapters", "backends", "aliases", "rollouts", "policy")


def load_config(path: str | Path) -> dict[str, Any]:
    """The file's settings, checked: scalars by option name, plus ``adapters``, ``backends``
    (name → :class:`BackendSpec`), ``aliases``, ``rollouts`` and the policy numbers."""
    path = Path(path)
    raw = _read(path)
    where = str(path)
    unknown = sorted(set(raw) - set(SCALARS) - set(MAPPINGS))
    if unknown:
        known = ", ".join([*SCALARS, *MAPPINGS])
        raise ValueError(f"{where}: '{unknown[0]}' is not a serve setting; use one of {known}")
    settings: dict[str, Any] = {}
    for key, kind in SCALARS.items():
        if key in raw:
            settings[key] = _scalar(raw[key], kind, f"{where}: {key}")
    policy = _mapping(raw, "policy", where)
    for key, value in policy.items():
        if key not in POLICY:
            raise ValueError(f"{where}: policy.{key} is not a policy number; use one of {', '.join(POLICY)}")
        settings[key] = _scalar(value, POLICY[key], f"{where}: policy.{key}")
    settings["adapters"] = {
        str(k): _scalar(v, str, f"{where}: adapters.{k}") for k, v in _mapping(raw, "adapters", where).items()
    }
    settings["backends"] = {
        str(k): _backend(str(k), v, f"{where}: backends.{k}")
        for k, v in _mapping(raw, "backends", where).items()
    }
    settings["aliases"] = {
        str(k): _shares(v, f"{where}: aliases.{k}") for k, v in _mapping(raw, "aliases", where).items()
    }
    settings["rollouts"] = {
        str(k): _schedule(v, f"{where}: rollouts.{k}") for k, v in _mapping(raw, "rollouts", where).items()
    }
    return settings


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file; give the path of a serve YAML file") from None
    except OSError as err:
        raise ValueError(f"--config {path}: cannot read it ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; save the config as UTF-8 YAML") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ValueError(f"{path}:{line}: {problem}; fix the YAML syntax there") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(
            f"{path}: the file must be a YAML mapping of settings (base:, backends:, aliases: ...)"
        )
    return raw


def _mapping(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {key} must be a mapping of NAME: VALUE, got {type(value).__name__}")
    return value


def _scalar(value: Any, kind: type, where: str) -> Any:
    ok = (
        isinstance(value, kind)
        if kind is not float
        else isinstance(value, int | float) and math.isfinite(value)
    ) and not isinstance(value, bool)
    if not ok:
        name = {str: "a string", int: "a whole number", float: "a number"}[kind]
        raise ValueError(f"{where}: {value!r} is not {name}; write {name} there")
    return float(value) if kind is float else value


def _backend(name: str, value: Any, where: str) -> BackendSpec:
    if isinstance(value, str):
        try:
            spec = parse_backend(f"{name}={value}")
        except ValueError as err:
            raise ValueError(f"{where}: {str(err).split(': ', 1)[1]}") from None
        return spec
    if not isinstance(value, dict) or not isinstance(value.get("url"), str):
        raise ValueError(
            f"{where}: give url (and optionally model, api_key_env), e.g. {{url: http://host:8000/v1}}"
        )
    extra = sorted(set(value) - {"url", "model", "api_key_env"})
    if extra:
        raise ValueError(f"{where}.{extra[0]}: not a backend field; use url, model or api_key_env")
    model, key_env = value.get("model"), value.get("api_key_env")
    for field, item in (("model", model), ("api_key_env", key_env)):
        if item is not None and not (isinstance(item, str) and item):
            raise ValueError(f"{where}.{field}: {item!r} is not a name; write a non-empty string")
    if key_env is not None and not os.environ.get(key_env):
        raise ValueError(f"{where}.api_key_env: ${key_env} is not set; export it before starting the server")
    return BackendSpec(name, normalise_url(value["url"], where=f"{where}.url"), model, key_env)


def _shares(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{where}: give the variants' shares as a mapping, e.g. {{stock: 0.9, tuned: 0.1}}")
    return {str(k): _scalar(v, float, f"{where}.{k}") for k, v in value.items()}


def _schedule(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: give the shares in order as a list, e.g. [0.05, 0.25, 1.0]")
    return [_scalar(v, float, f"{where}[{i}]") for i, v in enumerate(value)]
