"""Settings: ``default.yaml``, then the host file, then ``${VAR:default}`` from the environment.

Read once at an entry point with :func:`load_settings` and passed down as one frozen object.
A bad file fails at start-up with the file, the field and the reason (:class:`ConfigError`).

The default configuration ships inside this package (``mfh_models/config/``; the repository's
``config/`` points at it); ``--config-dir`` or ``MFH_CONFIG_DIR`` name another directory.
Relative data paths (``storage.sqlite_path``, ``scheduler.snapshot_dir``) resolve against one data
directory, ``MFH_DATA_DIR`` (default ``$XDG_DATA_HOME/mfh``, else ``~/.local/share/mfh``), once,
when the settings are loaded: never against the current directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from mfh_models.crontab import validate_crontab
from mfh_models.errors import ConfigError
from mfh_models.records import validate_origin

__all__ = [
    "BulkheadSettings",
    "CircuitBreakerSettings",
    "FrontSettings",
    "MetricsSettings",
    "NearCacheSettings",
    "RecoverySettings",
    "ReplicationSettings",
    "ResilienceSettings",
    "SchedulerSettings",
    "ServerSettings",
    "Settings",
    "StorageSettings",
    "WriteBehindSettings",
    "default_config_dir",
    "default_data_dir",
    "load_settings",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    bind: str = "127.0.0.1"
    zmq_port: int = Field(default=5713, ge=0, le=65535)
    grpc_port: int = Field(default=5714, ge=0, le=65535)
    metrics_port: int = Field(default=9713, ge=0, le=65535)
    max_workers: int = Field(default=8, ge=1, le=256)
    max_message_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    deadline_seconds: float = Field(default=5.0, gt=0, le=300)
    max_concurrent_rpcs: int = Field(default=256, ge=1, description="unary calls (gRPC) or requests (ZeroMQ) at once")
    api_key: SecretStr | None = None
    # Scoped API keys (docs/security.md, "Scoped keys"): absolute path of a YAML/JSON keys file; reloaded on SIGHUP.
    api_keys_file: str | None = Field(default=None, description="scoped API keys (name, namespaces, mode)")
    # Fairness and memory bounds (docs/operations.md, "Hostile or greedy peers").
    max_in_flight_per_peer: int = Field(default=16, ge=1, description="ZeroMQ requests of one connection at once")
    max_running_per_peer: int = Field(default=4, ge=1, description="of those, running; the others wait their turn")
    max_in_flight_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="ZeroMQ request bytes held")
    zmq_queue_messages: int = Field(default=16, ge=1, le=100_000, description="libzmq RCVHWM/SNDHWM per peer")
    max_streams: int = Field(default=1024, ge=1, description="open gRPC streams (Watch, health, reflection)")
    max_streams_per_peer: int = Field(default=128, ge=1, description="open gRPC streams of one connection")
    watch_idle_seconds: float = Field(default=900.0, gt=0, description="a Watch with no event this long ends")
    watch_max_lifetime_seconds: float = Field(default=3600.0, gt=0, description="a Watch ends after this long")
    gc_full_interval_seconds: float = Field(default=300.0, gt=0, description="api: full garbage collection period")
    gc_rss_growth_mb: float = Field(default=64.0, ge=0, description="api: or once RSS grew this much (0: off)")
    # The api's event loop: uvloop (the server extra installs it) when importable, else asyncio's own.
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(default="asyncio", description="api: event loop")
    # Transport security (docs/security.md): absolute paths; unset = plain text (loopback only, or --insecure).
    tls_cert_file: str | None = Field(default=None, description="gRPC server certificate chain (PEM)")
    tls_key_file: str | None = Field(default=None, description="its private key (PEM)")
    tls_client_ca_file: str | None = Field(default=None, description="CA whose client certificates are required")
    zmq_curve_secret_file: str | None = Field(default=None, description="ZeroMQ CURVE server key pair (zmq.auth)")
    zmq_curve_clients_dir: str | None = Field(default=None, description="public keys of the allowed CURVE clients")

    @model_validator(mode="after")
    def _security_files(self) -> ServerSettings:
        files = {
            "tls_cert_file": self.tls_cert_file,
            "tls_key_file": self.tls_key_file,
            "tls_client_ca_file": self.tls_client_ca_file,
            "zmq_curve_secret_file": self.zmq_curve_secret_file,
            "zmq_curve_clients_dir": self.zmq_curve_clients_dir,
        }
        for name, path in files.items():
            if path is not None and not os.path.isabs(path):
                raise ValueError(f"{name} must be an absolute path (got {path[:200]!r})")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file (client certificates need TLS)")
        if self.zmq_curve_clients_dir is not None and self.zmq_curve_secret_file is None:
            raise ValueError("zmq_curve_clients_dir needs zmq_curve_secret_file (the server's CURVE key pair)")
        return self

    @field_validator("api_keys_file")
    @classmethod
    def _keys_file_is_absolute(cls, path: str | None) -> str | None:
        if path is not None and not os.path.isabs(path):
            raise ValueError(f"api_keys_file must be an absolute path (got {path[:200]!r})")
        return path

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def curve(self) -> bool:
        return self.zmq_curve_secret_file is not None


class FrontSettings(_Section):
    """``mfh front``: the ZeroMQ ROUTER on ``server.zmq_port`` that spreads requests over api replicas."""

    replicas: list[str] = Field(default_factory=list, description="ZeroMQ endpoints of the api replicas")
    heartbeat_ms: int = Field(default=200, ge=10, le=10_000, description="a ping to each replica this often")
    dead_after_ms: int = Field(default=1000, ge=50, le=60_000, description="no answer this long: out of rotation")
    max_in_flight: int = Field(default=1024, ge=1, description="requests held by the front, all peers")
    max_resends: int = Field(default=2, ge=0, le=10, description="re-sends of a request whose replica died")

    @field_validator("replicas", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        # From the environment: "tcp://127.0.0.1:5715,tcp://127.0.0.1:5717" (commas or spaces).
        if value is None:
            return []
        if isinstance(value, str):
            return [part for part in re.split(r"[,\s]+", value) if part]
        return value

    @field_validator("replicas")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        for endpoint in value:
            if not re.fullmatch(r"(tcp://[^\s/]+:[0-9]{1,5}|ipc://\S+)", endpoint):
                raise ValueError(f"replica {endpoint[:200]!r} is not a ZeroMQ endpoint (tcp://host:port or ipc://path)")
        if len(set(value)) != len(value):
            raise ValueError("a replica is listed twice")
        return value


class StorageSettings(_Section):
    write_strategy: Literal["event_sourcing", "direct"] = "event_sourcing"
    sqlite_path: str = "memory.db"
    postgres_url: str | None = None
    redis_url: str = "redis://127.0.0.1:6380/0"  # the hub's own Redis, with AOF (scripts/hub_redis.py)
    redis_prefix: str = Field(default="mfh", pattern=r"^[A-Za-z0-9_.\-]{1,32}$")
    cache_ttl_seconds: int = Field(default=900, ge=1)
    # Test only (tests/cluster): shift this host's version clock, as a host whose clock is wrong would.
    clock_skew_ms: int = Field(default=0, ge=-86_400_000, le=86_400_000, description="added to new versions' time")

    @property
    def database_url(self) -> str:
        """Postgres when a URL is given, else the SQLite file."""
        return self.postgres_url or f"sqlite:///{self.sqlite_path}"


class WriteBehindSettings(_Section):
    queue_name: str = Field(default="mfh_persist", pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    batch_max_size: int = Field(default=256, ge=1, le=10_000)
    batch_max_delay_ms: float = Field(default=2.0, ge=0, le=1000)
    max_backlog: int = Field(default=100_000, ge=1, description="dirty entries before writes are refused")
    max_retries: int = Field(default=25, ge=0)
    min_backoff_ms: int = Field(default=200, ge=1)
    max_backoff_ms: int = Field(default=10_000, ge=1)
    heartbeat_timeout_ms: int = Field(default=10_000, ge=500)
    maintenance_chance: int = Field(default=1_000, ge=1, le=1_000_000, description="per million broker calls")
    dead_message_ttl_ms: int = Field(default=7 * 86_400_000, ge=1000)
    worker_processes: int = Field(default=1, ge=1)
    worker_threads: int = Field(default=4, ge=1)
    stale_dirty_seconds: float = Field(default=60.0, gt=0, description="reconcile re-enqueues older dirty entries")


class ReplicationSettings(_Section):
    enabled: bool = True
    event_topic: str = Field(default="memory_events", pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    subject_prefix: str = "mfh.events"
    nats_url: str = "nats://127.0.0.1:4222"
    duplicate_window_seconds: float = Field(default=120.0, gt=0)
    max_age_days: float = Field(default=30.0, gt=0)
    num_replicas: int = Field(default=1, ge=1, le=5)
    publish_timeout_seconds: float = Field(default=2.0, gt=0)
    #: Core NATS subjects of the cross-host audit (``mfh audit --peers``): ``<prefix>.<event_topic>``.
    audit_subject_prefix: str = Field(default="mfh.audit", pattern=r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
    # NATS security (docs/security.md, "NATS"). TLS is required when the URL says tls:// or any TLS file
    # is set; credentials are user + password (or both in the URL, nats://user:password@host) or a token.
    nats_tls_ca_file: str | None = Field(default=None, description="CA the NATS server's certificate must chain to")
    nats_tls_cert_file: str | None = Field(default=None, description="client certificate for NATS (PEM, optional)")
    nats_tls_key_file: str | None = Field(default=None, description="its private key (PEM)")
    nats_tls_server_name: str | None = Field(default=None, description="name to verify instead of the URL's host")
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_token: SecretStr | None = None
    #: Upload each snapshot to the cluster's Object Store bucket ``<event_topic>_snapshots`` (``mfh join``).
    share_snapshots: bool = True
    shared_snapshots_keep: int = Field(default=2, ge=1, description="shared snapshots kept per host")

    @model_validator(mode="after")
    def _audit_outside_stream(self) -> ReplicationSettings:
        # A request on a subject the stream captures would be stored as an event and PubAck'ed.
        if (self.audit_subject_prefix + ".").startswith(self.subject_prefix.strip(".") + "."):
            raise ValueError(
                f"audit_subject_prefix {self.audit_subject_prefix!r} lies under subject_prefix "
                f"{self.subject_prefix!r}: the stream would store the audit's requests"
            )
        return self

    @model_validator(mode="after")
    def _nats_security(self) -> ReplicationSettings:
        check_nats_security(self)
        return self

    @property
    def nats_tls(self) -> bool:
        """Whether NATS must be reached over TLS: a tls:// URL or any TLS setting."""
        return urlsplit(self.nats_url).scheme == "tls" or any(
            v is not None
            for v in (self.nats_tls_ca_file, self.nats_tls_cert_file, self.nats_tls_key_file, self.nats_tls_server_name)
        )


def check_nats_security(r: ReplicationSettings) -> None:
    """Refuse half a NATS security configuration (a certificate without its key, a user without a password)."""
    try:
        url = urlsplit(r.nats_url)
        url_user, _ = url.username, url.password  # the password: raises on a malformed URL
    except ValueError as e:
        raise ValueError(f"nats_url is not a URL: {e}") from None
    if url.scheme not in ("nats", "tls"):
        raise ValueError(f"nats_url must start with nats:// or tls:// (got {url.scheme or 'no'} scheme)")
    for name in ("nats_tls_ca_file", "nats_tls_cert_file", "nats_tls_key_file"):
        path = getattr(r, name)
        if path is not None and not os.path.isabs(path):
            raise ValueError(f"{name} must be an absolute path (got {path[:200]!r})")
    if (r.nats_tls_cert_file is None) != (r.nats_tls_key_file is None):
        raise ValueError("nats_tls_cert_file and nats_tls_key_file go together: set both or neither")
    if (r.nats_user is None) != (r.nats_password is None):
        raise ValueError("nats_user and nats_password go together: set both or neither")
    if url_user is not None and (r.nats_user is not None or r.nats_token is not None):
        raise ValueError("nats_url carries credentials and so do nats_user/nats_token: give them in one place")
    if r.nats_token is not None and r.nats_user is not None:
        raise ValueError("nats_token and nats_user/nats_password are two ways to log in: set one")


class CircuitBreakerSettings(_Section):
    """An open breaker probes ``first_probe_seconds`` after opening, then backs off (with jitter) up to
    ``reset_timeout`` between probes: a store that answers again is back within about ``reset_timeout``."""

    failure_threshold: int = Field(default=5, ge=1)
    reset_timeout: float = Field(default=1.0, gt=0, le=60, description="longest wait between two probes")
    first_probe_seconds: float = Field(default=0.1, gt=0)
    summary_every_seconds: float = Field(default=15.0, gt=0, description="outage summary log interval")


class BulkheadSettings(_Section):
    max_concurrent: int = Field(default=32, ge=1)
    max_queue_size: int = Field(default=128, ge=0)


class ResilienceSettings(_Section):
    circuit_breaker: CircuitBreakerSettings = CircuitBreakerSettings()
    bulkhead: BulkheadSettings = BulkheadSettings()


class SchedulerSettings(_Section):
    snapshot_interval_seconds: float = Field(default=3600, gt=0)
    snapshot_dir: str = Field(default="snapshots", min_length=1)
    snapshot_keep: int = Field(default=24, ge=1, description="snapshots kept per host")
    audit_cron: str = "30 3 * * *"
    reconcile_interval_seconds: float = Field(default=30, gt=0)
    prune_events: bool = Field(
        default=False, description="after each snapshot, delete events older than the oldest kept snapshot"
    )
    archive_pruned_events: bool = Field(
        default=True, description="write pruned events to events-<host>-<first>-<last>.jsonl.gz in snapshot_dir first"
    )
    #: The cross-host audit (``mfh audit --peers``) on a schedule; None: not scheduled. Its verdict
    #: reaches every host compared, so one host of a cluster is enough to schedule it.
    peer_audit_cron: str | None = None
    peer_audit_repair: bool = Field(default=False, description="the scheduled cross-host audit also repairs")

    @field_validator("audit_cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        return validate_crontab(v)

    @field_validator("peer_audit_cron")
    @classmethod
    def _peer_cron(cls, v: str | None) -> str | None:
        return validate_crontab(v) if v is not None and v.strip() else None


class RecoverySettings(_Section):
    """How fast lost batches come back (docs/operations.md, "Recovery"); a worker runs both timers.

    ``maintenance_interval_seconds``: Dramatiq's requeue of a dead worker's messages runs on this timer
    instead of on a random fraction of broker calls. ``sweep_*``: entries dirty for longer than
    ``sweep_stale_seconds`` are re-enqueued once (their batch may never have been sent), and all
    dirty entries are re-enqueued at once when Redis restarted (a new ``run_id``) or came back.
    """

    maintenance_interval_seconds: float = Field(default=2.0, ge=0, description="0 turns the timer off")
    sweep_interval_seconds: float = Field(default=2.0, ge=0, description="0 turns the sweep off")
    sweep_stale_seconds: float = Field(default=10.0, gt=0)


class NearCacheSettings(_Section):
    """The api's in-process cache of recently read entries (docs/operations.md, "The near cache").

    Kept correct by Redis client tracking: a change made anywhere is not hidden by this cache for
    longer than ``max_stale_ms`` (normally well under a millisecond); on a lost tracking connection
    the whole cache is dropped and stays off until tracking is back.
    """

    enabled: bool = True
    max_entries: int = Field(default=50_000, ge=1, description="records held at most")
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="approximate bytes of records held")
    max_absent_entries: int = Field(default=10_000, ge=0, description="confirmed absences held at most (0: none)")
    absent_ttl_seconds: float = Field(default=10.0, gt=0, description="a confirmed absence is forgotten after this")
    max_stale_ms: float = Field(
        default=50.0, ge=1, le=10_000, description="hits only while the feed confirmed it is this fresh"
    )


class ExpirySettings(_Section):
    """Record expiry (``expires_at_ms`` / a put's ``ttl_seconds``): reads hide an expired record at once;
    the scheduler's sweep tombstones it every ``sweep_interval_seconds`` (0 turns the sweep off).
    ``refresh_on_read``: namespaces (a name covers the names below it) whose reads extend a TTL."""

    sweep_interval_seconds: float = Field(default=30.0, ge=0)
    sweep_batch: int = Field(default=500, ge=1, le=10_000)
    refresh_on_read: list[str] = Field(default_factory=list)


class MetricsSettings(_Section):
    """Prometheus ports of the non-api processes (the api's is ``server.metrics_port``); 0 turns one off."""

    worker_port: int = Field(default=9714, ge=0, le=65535)
    replicator_port: int = Field(default=9715, ge=0, le=65535)
    scheduler_port: int = Field(default=9716, ge=0, le=65535)
    front_port: int = Field(default=9718, ge=0, le=65535)


class Settings(_Section):
    """The whole configuration of one host."""

    title: str = "MemoryFusionHubConfig"
    version: str = "1.0"
    host_id: str = "main_pc"
    data_dir: str | None = Field(default=None, description="where relative data paths resolve (absolute)")
    server: ServerSettings = ServerSettings()
    front: FrontSettings = FrontSettings()
    storage: StorageSettings = StorageSettings()
    write_behind: WriteBehindSettings = WriteBehindSettings()
    replication: ReplicationSettings = ReplicationSettings()
    resilience: ResilienceSettings = ResilienceSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    metrics: MetricsSettings = MetricsSettings()
    recovery: RecoverySettings = RecoverySettings()
    near_cache: NearCacheSettings = NearCacheSettings()
    expiry: ExpirySettings = ExpirySettings()

    @model_validator(mode="after")
    def _check_host(self) -> Settings:
        validate_origin(self.host_id)
        return self

    def masked(self) -> dict[str, Any]:
        """The merged settings as plain data with secrets masked (``mfh config show``)."""
        data = self.model_dump(mode="json")
        key = self.server.api_key
        data["server"]["api_key"] = "********" if key and key.get_secret_value() else None
        for section, field in (
            ("storage", "postgres_url"),
            ("storage", "redis_url"),
            ("replication", "nats_url"),
        ):
            if data[section][field]:
                data[section][field] = _mask_url_password(data[section][field])
        for field in ("nats_password", "nats_token"):  # NATS credentials
            secret = getattr(self.replication, field)
            data["replication"][field] = "********" if secret is not None else None
        data["replication"]["nats_url"] = re.sub(r"://[^:/@]+@", "://****@", data["replication"]["nats_url"])
        return data


def _mask_url_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1****@", url)


#: The host whose file applies when neither --host nor MFH_HOST names one.
DEFAULT_HOST = "main_pc"

_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}")


def _interpolate(value: Any, env: Mapping[str, str], where: str) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, env, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is None:
            raise ConfigError(f"{where}: environment variable {name} is not set and has no default")
        return default

    whole = _VAR_RE.fullmatch(value)
    out = _VAR_RE.sub(sub, value)
    # A value that is one ${VAR} and empty means "not set" (for example api_key: "${MFH_API_KEY:}").
    if whole and out == "":
        return None
    return out


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def default_config_dir() -> Path:
    """The configuration shipped inside this package (``mfh_models/config``)."""
    return Path(__file__).resolve().parent / "config"


def default_data_dir(env: Mapping[str, str]) -> Path:
    """``$MFH_DATA_DIR``, else ``$XDG_DATA_HOME/mfh``, else ``~/.local/share/mfh`` (absolute)."""
    if env.get("MFH_DATA_DIR"):
        return Path(env["MFH_DATA_DIR"]).expanduser().absolute()
    if env.get("XDG_DATA_HOME"):
        return Path(env["XDG_DATA_HOME"]).expanduser().absolute() / "mfh"
    home = env.get("HOME")
    return (Path(home) if home else Path.home()) / ".local" / "share" / "mfh"


#: Settings that name files or directories: relative values resolve against the data directory.
_DATA_PATHS = (("storage", "sqlite_path"), ("scheduler", "snapshot_dir"))


def _resolve_data_paths(merged: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    data_dir = Path(merged["data_dir"]).expanduser() if merged.get("data_dir") else default_data_dir(env)
    data_dir = data_dir.absolute()
    out = dict(merged, data_dir=str(data_dir))
    defaults = Settings()
    for section, field in _DATA_PATHS:
        if not isinstance(out.get(section) or {}, dict):
            continue  # validation names the section
        sec = dict(out.get(section) or {})
        raw = sec.get(field, getattr(getattr(defaults, section), field))
        if isinstance(raw, str) and raw:
            path = Path(raw).expanduser()
            sec[field] = str(path if path.is_absolute() else data_dir / path)
        out[section] = sec
    return out


def load_settings(
    host: str | None = None,
    *,
    config_dir: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge default.yaml, the host's file and ``overrides``; interpolate; validate.

    ``host`` falls back to ``MFH_HOST`` in ``env``, then to ``main_pc`` when the config dir has its
    file; otherwise default.yaml stands alone.
    """
    env = os.environ if env is None else env
    cdir = Path(config_dir) if config_dir is not None else Path(env.get("MFH_CONFIG_DIR") or default_config_dir())
    host = host or env.get("MFH_HOST") or None
    if host is None and (cdir / f"{DEFAULT_HOST}.yaml").exists():
        # The first host is the default everywhere (CLI, workers, scheduler), so that a command run
        # without --host reads the same stores as the Procfile's processes.
        host = DEFAULT_HOST
    files = [cdir / "default.yaml"]
    if host:
        host_file = cdir / f"{host}.yaml"
        if not host_file.exists():
            raise ConfigError(f"{host_file}: no configuration for host {host!r}")
        files.append(host_file)
    merged: dict[str, Any] = {}
    for f in files:
        try:
            merged = _merge(merged, _interpolate(_read_yaml(f), env, ""))
        except ConfigError as e:
            raise ConfigError(e.message if e.message.startswith(str(f)) else f"{f}: {e.message}") from None
    if overrides:
        merged = _merge(merged, overrides)
    if host and "host_id" not in merged:
        merged["host_id"] = host
    merged = _resolve_data_paths(merged, env)
    try:
        return Settings.model_validate(merged)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in e.errors(include_url=False)
        )
        raise ConfigError(f"{' + '.join(str(f) for f in files)}: {problems}") from None
    except ConfigError:
        raise
    except Exception as e:  # a validator's own error (for example the host id)
        raise ConfigError(f"{' + '.join(str(f) for f in files)}: {e}") from e
