"""The hub's configuration: etc/hub.yaml plus BSSCIHUB_* environment overrides.

Loaded once into frozen attrs values; a bad or unknown key is a ConfigError naming the key.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
import yaml

from bsscihub.contract import masked_url

T = TypeVar("T")

ENV_PREFIX = "BSSCIHUB_"


class ConfigError(Exception):
    """A user mistake in the configuration; str() is the one line to print."""

    def __init__(self, key: str, value: object, expected: str, *, secret: bool = False) -> None:
        self.key, self.value, self.expected = key, value, expected
        # The line goes to a terminal or a container's log: no secret setting's value, no URL's password.
        shown = "'***'" if secret else repr(masked_url(value) if isinstance(value, str) else value)
        super().__init__(f"config error: {key} = {shown}: {expected}")


# --- value parsers: each takes the raw YAML value and raises ValueError("expected ...")


def _str(value: Any) -> str:
    if isinstance(value, (dict, list)) or value is None:
        raise ValueError("expected a string")
    return str(value)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError("expected true or false")


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("expected a positive whole number")
    return value


def mqtt_url_or_empty(value: Any) -> str:
    """A broker URL for a family's own connection or for its devices; empty means mqtt.url."""
    text = _str(value)
    if text and not text.startswith(("mqtt://", "mqtts://")):
        raise ValueError("expected empty (use mqtt.url) or mqtt://host:port / mqtts://host:port")
    return text


def _limit(value: Any) -> int:
    """A bound where 0 means none."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("expected a whole number, 0 for no limit")
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def duration(value: Any) -> float:
    """Seconds, as a number or with a unit: 0.5, "500ms", "5m", "36h", "7d"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value)) if isinstance(value, str) else None
        if match is None:
            raise ValueError("expected a duration in seconds, e.g. 0.5, 500ms, 5m, 36h")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError("expected a duration greater than zero")
    return seconds


def one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return str(value)

    return parse


def _endpoint(value: Any) -> str:
    text = _str(value)
    if not re.match(r"^(tcp|tcp6|unix|ssl|systemd):\S+$", text):
        raise ValueError("expected a Twisted endpoint string such as tcp:8080:interface=127.0.0.1")
    return text


def _names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) and value.strip().startswith("["):
        value = _flow_list(value)
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of names")
    return tuple(value)


def topic_filters(value: Any) -> tuple[str, ...]:
    """MQTT topic filters: '+' and '#' only as whole levels, '#' last, no '$' topics."""
    filters = _names(value)
    if not filters:
        raise ValueError("expected at least one MQTT topic filter")
    for f in filters:
        levels = f.split("/")
        bad = (
            not f
            or f.startswith("$")
            or any(("+" in level or "#" in level) and level not in ("+", "#") for level in levels)
            or "#" in levels[:-1]
        )
        if bad:
            raise ValueError(f"expected MQTT topic filters such as SensorData/# or site/+/data, not {f!r}")
    return filters


def _networks(value: Any) -> tuple[str, ...]:
    from bsscihub.web.proxy import parse_networks

    names = () if value in (None, "", []) else _names(value)
    return tuple(str(n) for n in parse_networks(names))


def _rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
        raise ValueError("expected a number of requests per second (0 turns the limit off)")
    return float(value)


def _origins(value: Any) -> tuple[str, ...]:
    names = () if value in (None, "", []) else _names(value)
    for name in names:
        parts = urlsplit(name)
        if name != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query):
            raise ValueError(f"expected origins such as https://app.example.com (or *); {name!r} is not one")
    return tuple(n.rstrip("/") for n in names)


def _token_hash(value: Any) -> str:
    text = _str(value).strip()
    if text and not re.fullmatch(r"sha256:[0-9a-f]{64}", text):
        raise ValueError("expected sha256:<64 hex digits> (the token's SHA-256), never the token itself")
    return text


def _database(value: Any) -> str:
    text = _str(value)
    scheme = urlsplit(text).scheme
    if scheme not in ("sqlite", "postgresql", "postgres"):
        raise ValueError("expected sqlite:///FILE or postgresql://user:password@host/dbname")
    return text


def _mqtt_url(value: Any) -> str:
    text = _str(value)
    parts = urlsplit(text)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError("expected mqtt://host:port or mqtts://host:port")
    try:
        _ = parts.port  # urlsplit only validates the port when asked
    except ValueError:
        raise ValueError("expected a numeric port in the URL") from None
    return text


def _topic_root(value: Any) -> str:
    text = _str(value)
    if not text or any(c in text for c in "#+") or text.startswith("/") or text.endswith("/"):
        raise ValueError("expected a topic root without wildcards or leading/trailing '/'")
    return text


def setting(default: Any, parse: Callable[[Any], Any], doc: str, *, secret: bool = False) -> Any:
    """An attrs field of a config section: its default, parser and one-line doc."""
    return attrs.field(default=default, metadata={"parse": parse, "doc": doc, "secret": secret})


# --- the core sections (families add their own through IFamily.config_sections)


@attrs.frozen
class LogConfig:
    level: str = setting("info", one_of("debug", "info", "warn", "error"), "lowest level logged")
    format: str = setting("text", one_of("text", "json"), "text for people, json for log collectors")


@attrs.frozen
class TLSConfig:
    ca: str = setting("certs/ca.pem", _str, "CA certificate that signs base-station client certificates")
    cert: str = setting("certs/hub.pem", _str, "the hub's server certificate")
    key: str = setting("certs/hub.key", _str, "the hub's server key", secret=True)
    ca_key: str = setting("certs/ca.key", _str, "CA key, used to issue base-station certificates", secret=True)
    lenient: bool = setting(False, _bool, "accept legacy CAs without keyUsage (verification stays on)")


@attrs.frozen
class WebConfig:
    listen: str = setting("tcp:8080:interface=127.0.0.1", _endpoint, "endpoint of the web UI and API")
    https: bool = setting(False, _bool, "serve HTTPS with tls.cert/tls.key")
    session_idle: float = setting(1800.0, duration, "admin session idle expiry")
    session_max: float = setting(43200.0, duration, "admin session absolute expiry")
    trusted_proxies: tuple[str, ...] = setting((), _networks, "reverse proxies whose X-Forwarded-*/Forwarded count")
    rate_limit: float = setting(20.0, _rate, "API requests per second per client (0: no limit)")
    rate_burst: int = setting(100, _positive_int, "API requests a client may make at once")
    anonymous_rate_limit: float = setting(5.0, _rate, "requests per second per address to routes without login")
    anonymous_rate_burst: int = setting(50, _positive_int, "such requests an address may make at once")
    cors_origins: tuple[str, ...] = setting((), _origins, "other origins whose browser apps may call the API")
    public_health: bool = setting(False, _bool, "/health details and /metrics without a login")
    metrics_token: str = setting("", _token_hash, "sha256: hash of a token that may read /metrics and /health",
                                 secret=True)
    audit_retention: float = setting(365 * 86400.0, duration, "how long audit entries are kept")


@attrs.frozen
class MQTTConfig:
    url: str = setting("mqtt://127.0.0.1:1883", _mqtt_url, "broker URL; mqtts:// for TLS")
    username: str = setting("", _str, "broker user (or in the URL)")
    password: str = setting("", _str, "broker password (or in the URL)", secret=True)
    prefix: str = setting("bsscihub", _topic_root, "root of every topic the hub publishes and takes commands on")
    client_id: str = setting(
        "bsscihub", _str, "stable MQTT client id (persistent session; cluster: -node added, no session)")
    protocol: str = setting("5", one_of("5", "3.1.1"), "MQTT protocol version")
    ca: str = setting("", _str, "CA file for mqtts:// (empty: system CAs)")
    cert: str = setting("", _str, "client certificate for mqtts:// (optional)")
    key: str = setting("", _str, "client key for mqtts:// (optional)", secret=True)
    keepalive: int = setting(30, _positive_int, "keepalive interval in seconds")
    outbox_max: int = setting(1_000_000, _positive_int, "most messages kept while the broker is away")
    outbox_overflow: str = setting(
        "drop_oldest", one_of("drop_oldest", "drop_new"), "what to drop when the outbox is full"
    )
    layout: str = setting(
        "standard", one_of("standard", "seed"), "seed: also speak the replaced service center's layout, both ways"
    )
    seed_base: str = setting("bssci", _topic_root, "topic root of the seed layout (bssci, as that service center)")


@attrs.frozen
class AlertsConfig:
    check_interval: float = setting(10.0, duration, "how often silences are checked against the alert rules")
    retention: float = setting(90 * 86400.0, duration, "how long the alert history is kept")


@attrs.frozen
class WebhooksConfig:
    timeout: float = setting(10.0, duration, "longest wait for a webhook receiver's answer")
    retry_min: float = setting(1.0, duration, "first pause before a failed delivery is tried again")
    retry_max: float = setting(300.0, duration, "longest pause between two tries (the pause doubles up to it)")
    max_queue: int = setting(100_000, _positive_int, "most events waiting per webhook; beyond, new ones are dropped")


def _redis_url(value: Any) -> str:
    from bsscihub.cluster import parse_redis_url

    text = "" if value is None else _str(value).strip()
    if text:
        parse_redis_url(text)
    return text


def _node_name(value: Any) -> str:
    text = "" if value is None else _str(value).strip()
    if text and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", text):
        raise ValueError("expected a name of letters, digits, '.', '_' or '-' (at most 64)")
    return text


@attrs.frozen
class ClusterConfig:
    redis: str = setting("", _redis_url, "redis://host:port/db shared by the hubs of a cluster (empty: one hub)")
    node: str = setting("", _node_name, "unique name of this hub, the same after restarts (required with redis)")


CORE_SECTIONS: dict[str, type] = {
    "log": LogConfig,
    "tls": TLSConfig,
    "web": WebConfig,
    "mqtt": MQTTConfig,
}

HUB_SECTIONS: dict[str, type] = {
    "alerts": AlertsConfig,
    "webhooks": WebhooksConfig,
    "cluster": ClusterConfig,
}
"""Sections of the hub's own optional parts; kept in HubConfig.sections like the families' ones."""

TOP_LEVEL: dict[str, tuple[Any, Callable[[Any], Any], str]] = {
    "data_dir": ("var", _str, "where SQLite, the outbox and (by default) the key files live"),
    "keys_dir": ("", _str, "the key files sealing stored secrets; one directory shared by all hubs of a cluster"
                 " (empty: data_dir)"),
    "database": ("sqlite:///hub.sqlite", _database, "sqlite:///FILE (relative: inside data_dir) or postgresql://..."),
    "families": (None, _names, "enabled device families (default: every installed one)"),
}


@attrs.frozen
class HubConfig:
    data_dir: Path
    keys_dir: Path
    """gate.key, meter-keys.secret, webhook-keys.secret: what one hub seals, every hub of its cluster opens."""
    database: str
    families: tuple[str, ...] | None
    log: LogConfig
    tls: TLSConfig
    web: WebConfig
    mqtt: MQTTConfig
    sections: Mapping[str, Any] = attrs.field(factory=dict)
    """Family sections by name (e.g. "mioty", "bssci")."""

    def section(self, name: str) -> Any:
        if name in CORE_SECTIONS:
            return getattr(self, name)
        return self.sections[name]

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file, or None for PostgreSQL."""
        parts = urlsplit(self.database)
        if parts.scheme != "sqlite":
            return None
        path = Path(parts.path[1:] if parts.path.startswith("/") else parts.path)
        return path if path.is_absolute() else self.data_dir / path

    def masked(self) -> dict[str, Any]:
        """Everything, secrets replaced by '***': for the read-only config view."""
        out: dict[str, Any] = {
            "data_dir": str(self.data_dir),
            "keys_dir": str(self.keys_dir),
            "database": masked_url(self.database),
            "families": list(self.families or ()),
        }
        named = {name: getattr(self, name) for name in CORE_SECTIONS} | dict(self.sections)
        for name, value in named.items():
            out[name] = {f.name: _masked_value(f, getattr(value, f.name)) for f in attrs.fields(type(value))}
        return out


def _masked_value(field: Any, value: Any) -> Any:
    if field.metadata.get("secret") and value:
        return "***"
    if isinstance(value, str) and "://" in value:
        return masked_url(value)  # any URL may carry user:password@
    return list(value) if isinstance(value, tuple) else value


def build_section(cls: type[T], name: str, raw: Any) -> T:
    """Parse one section mapping into its attrs class; unknown keys are errors."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(name, raw, "expected a mapping of keys")
    fields = {f.name: f for f in attrs.fields(cls)}  # type: ignore[arg-type]
    values = {}
    for key, value in raw.items():
        field = fields.get(key)
        if field is None:
            raise ConfigError(f"{name}.{key}", value, "unknown key; known: " + ", ".join(sorted(fields)))
        try:
            values[key] = field.metadata["parse"](value)
        except ValueError as e:
            raise ConfigError(f"{name}.{key}", value, str(e), secret=field.metadata.get("secret", False)) from None
    return cls(**values)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_INTEGER = re.compile(r"^\s*[+-]?\d+\s*$")


def _flow_list(text: str) -> Any:
    """A YAML flow sequence ("[a, b]") from the environment; anything else stays text."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, list) else text


def from_env(kind: Any, text: str) -> Any:
    """The environment's text read by the key's declared type, before its parser validates it.

    Strings stay strings ("0123" is a password, not 83); integers are decimal; booleans take
    true/false, yes/no, on/off, 1/0; lists take "a, b" or "[a, b]". What does not read as the
    type is passed on as text, so that the key's parser names the value in its error.
    """
    if kind is bool:
        word = text.strip().lower()
        return True if word in _TRUE else False if word in _FALSE else text
    if kind is int:
        return int(text, 10) if _INTEGER.match(text) else text
    if kind is float:
        try:
            return float(text)
        except ValueError:
            return text  # a duration with a unit ("5m"): its parser reads it
    if typing.get_origin(kind) in (tuple, list):
        if text.strip().startswith("["):
            return _flow_list(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def _field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation we cannot resolve: the key then gets text
        return {}


def _env_overrides(raw: dict[str, Any], environ: Mapping[str, str], sections: Mapping[str, type]) -> None:
    """Apply BSSCIHUB_<SECTION>_<KEY> and BSSCIHUB_<KEY>, each read by the key's own type."""
    for var, text in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        if rest in TOP_LEVEL:
            raw[rest] = text  # top-level parsers all take text
            continue
        section, _, key = rest.partition("_")
        if section not in sections or not key:
            raise ConfigError(var, text, "unknown environment override; use BSSCIHUB_<SECTION>_<KEY>")
        current = raw.get(section)
        if not isinstance(current, dict):
            current = raw[section] = {}
        # An unknown key keeps its text; build_section then names it.
        current[key] = from_env(_field_types(sections[section]).get(key, str), text)


def load_config(
    path: str | os.PathLike[str] | None,
    environ: Mapping[str, str] | None = None,
    family_sections: Mapping[str, type] | None = None,
) -> HubConfig:
    """Read the YAML file (if any), apply environment overrides, validate everything."""
    environ = os.environ if environ is None else environ
    sections = dict(CORE_SECTIONS) | HUB_SECTIONS | dict(family_sections or {})
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError("--config", str(path), f"cannot read the file: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError("--config", str(path), f"not valid YAML: {e}".replace("\n", " ")) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("--config", str(path), "expected a YAML mapping at the top")
        raw = dict(loaded or {})
    _env_overrides(raw, environ, sections)

    top: dict[str, Any] = {}
    for key, (default, parse, _doc) in TOP_LEVEL.items():
        value = raw.pop(key, None)
        if value is None:
            top[key] = default
            continue
        try:
            top[key] = parse(value)
        except ValueError as e:
            raise ConfigError(key, value, str(e)) from None
    built: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in sections:
            known = sorted(set(TOP_LEVEL) | set(sections))
            raise ConfigError(key, value, "unknown key; known: " + ", ".join(known))
    for name, cls in sections.items():
        built[name] = build_section(cls, name, raw.get(name))
    core = {name: built.pop(name) for name in CORE_SECTIONS}
    if built["cluster"].redis and urlsplit(top["database"]).scheme == "sqlite":
        raise ConfigError("cluster.redis", masked_url(built["cluster"].redis),
                          "a cluster shares one PostgreSQL database: set database to postgresql://...")
    if top["families"] is not None:
        top["families"] = tuple(top["families"])
    return HubConfig(
        data_dir=Path(top["data_dir"]),
        keys_dir=Path(top["keys_dir"] or top["data_dir"]),
        database=top["database"],
        families=top["families"],
        sections=built,
        **core,
    )
