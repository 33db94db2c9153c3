"""Loading and validating the node's TOML configuration.

The file is read once into frozen dataclasses; every error names the file, the key and the rule,
e.g. ``/etc/msvlm-node/config.toml: [node] ae_title: 'A_VERY_LONG_AE_TITLE' is longer than 16
characters``. Unknown sections and keys are errors too, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/msvlm-node/config.toml")
CONFIG_ENV = "MSVLM_NODE_CONFIG"

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and the key."""


class DuplicatePolicy(str, enum.Enum):
    """What to do when a SOP Instance UID arrives again with different bytes."""

    KEEP = "keep"
    """Keep the stored instance, answer Success and log a warning (Orthanc's default)."""
    OVERWRITE = "overwrite"
    """Replace the stored instance with the new one."""
    REJECT = "reject"
    """Keep the stored instance and answer 0x0111 (Duplicate SOP Instance)."""


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeConfig:
    """``[node]``: this AE and its network limits."""

    ae_title: str = "MSVLM"
    bind_address: str = "0.0.0.0"
    port: int = 11112
    accept_unknown_peers: bool = False
    require_called_ae_title: bool = True
    max_associations: int = 16
    max_associations_per_address: int = 8  # at most max_associations (unset: the lower)
    max_pdu_bytes: int = 0
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    receive_processes: int = 0
    node_id: str = ""
    """Names this node's own spool (``incoming/<node_id>/``, ``tmp/<node_id>/``) when several
    nodes share one storage root and index (PostgreSQL); each drains only its own. ``""``: the
    single-node layout (``incoming/``, ``tmp/``)."""

    @property
    def effective_receive_processes(self) -> int:
        """Processes that accept associations (``0`` in the file = two per CPU core, at most
        32: an association per process, so concurrent senders do not share one interpreter's
        GIL; four senders on 2 cores went from 0.83-0.86x Orthanc with two processes to 1.07x
        with four, bench/ingest.py)."""
        return self.receive_processes or min(32, 2 * max(1, len(os.sched_getaffinity(0))))


@dataclass(frozen=True)
class TLSConfig:
    """``[tls]``: DICOM over TLS, on when ``certificate`` is set."""

    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @property
    def enabled(self) -> bool:
        return self.certificate is not None


@dataclass(frozen=True)
class PeerConfig:
    """``[peers.NAME]``: one remote AE that sends to us, receives from us, or both."""

    name: str
    ae_title: str
    host: str
    port: int
    allow_store: bool = True
    addresses: frozenset[str] = frozenset()
    """The IP addresses ``host`` resolved to when the config was loaded."""


@dataclass(frozen=True)
class StorageConfig:
    """``[storage]``: where instances and the index live."""

    root: Path = Path("/var/lib/msvlm-node")
    database_url: str = ""
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP
    min_free_bytes: int = 1_000_000_000
    retention_days: float = 0.0
    """Studies whose newest instance is older are purged once a day (0 = keep forever)."""

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.root / 'index.sqlite'}"


@dataclass(frozen=True)
class CompletionConfig:
    """``[completion]``: when a study counts as complete (whichever cue comes first)."""

    stable_age_s: float = 60.0
    """Quiet period: no image of the study for this long (the fallback for every sender)."""
    settle_s: float = 2.0
    """Wait after the association cue or the expected-count cue before the study is complete."""
    association_cue: bool = True
    """Complete ``settle_s`` after the association that brought the newest images is released
    and no other association holding the study is open."""
    expected_count_cue: bool = True
    """Complete ``settle_s`` after the newest image when every series holds as many images as
    its headers announce (Images in Acquisition)."""


DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "checkpoints" / "demo"


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: which checkpoint drafts the reports, and where it runs."""

    checkpoint: str = "demo"
    device: str = "auto"
    threads: int = 0

    @property
    def checkpoint_path(self) -> Path:
        """The checkpoint folder (``"demo"``: the one shipped in the package)."""
        return DEMO_CHECKPOINT if self.checkpoint == "demo" else Path(self.checkpoint)


@dataclass(frozen=True)
class SelectionConfig:
    """``[selection]``: which series the model reads (``None`` = what the checkpoint declares)."""

    modalities: tuple[str, ...] | None = None
    body_parts: tuple[str, ...] | None = None
    planes: tuple[str, ...] = ("axial", "coronal", "sagittal")
    phases: tuple[str, ...] = ("*",)
    min_slices: int = 16
    max_series: int = 4
    exclude_image_types: tuple[str, ...] = ("DERIVED", "SECONDARY", "LOCALIZER", "SCOUT")


@dataclass(frozen=True)
class ReportConfig:
    """``[report]``: where drafts go and in which forms."""

    send_to: tuple[str, ...] = ()
    send_back_to_sender: bool = False
    pdf: bool = False
    key_images: bool = False


@dataclass(frozen=True)
class DeliveryConfig:
    """``[delivery]``: retries of sending drafts (exponential backoff, then dead letters)."""

    retry_delay_s: float = 30.0
    max_retry_delay_s: float = 3600.0
    max_retries: int = 10


@dataclass(frozen=True)
class AuditConfig:
    """``[audit]``: the record of who sent what and who received which draft."""

    path: str = "audit.jsonl"
    """JSON lines file, relative to the storage root; ``""`` = no file."""
    journal: bool = False
    """Also log each line (logger ``node.audit``, so the journal under systemd)."""

    def file(self, root: Path) -> Path | None:
        return (root / self.path) if self.path else None


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: Prometheus metrics, health and readiness over HTTP (``node/metrics.py``)."""

    listen: str = ""
    """``"host:port"`` for ``/metrics``, ``/healthz`` and ``/readyz`` (say
    ``"127.0.0.1:9110"``); ``""`` = no listener (``msvlm-node status`` works either way)."""

    @property
    def address(self) -> tuple[str, int] | None:
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class WorkerConfig:
    """``[worker]``: the processes that run the model."""

    processes: int = 1
    lease_s: float = 60.0
    max_attempts: int = 3
    stream: bool = True
    """Encode the slices of eligible series while the study still arrives (idle workers only,
    yielding to a deep spool); at completion only the rest is read and encoded."""


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    path: Path | None = None
    node: NodeConfig = field(default_factory=NodeConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    peers: Mapping[str, PeerConfig] = field(default_factory=dict)
    storage: StorageConfig = field(default_factory=StorageConfig)
    completion: CompletionConfig = field(default_factory=CompletionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def file_store(self) -> Any:
        """The :class:`storage.files.FileStore` of this node (its own spool, the shared rest)."""
        from storage.files import FileStore

        return FileStore(self.storage.root, self.node.node_id)

    def peer_for_store(self, calling_ae_title: str, address: str) -> PeerConfig | None:
        """Return the peer allowed to store with this calling AE title from this address."""
        for peer in self.peers.values():
            if peer.allow_store and peer.ae_title == calling_ae_title and address in peer.addresses:
                return peer
        return None

    def to_toml(self) -> str:
        """The effective configuration as TOML text (what ``check-config`` prints)."""
        lines = [f"# effective configuration from {self.path}"]
        sections: list[tuple[str, Any]] = [
            ("node", self.node), ("tls", self.tls), ("storage", self.storage),
            ("completion", self.completion), ("model", self.model),
            ("selection", self.selection), ("report", self.report),
            ("delivery", self.delivery), ("worker", self.worker), ("audit", self.audit),
            ("metrics", self.metrics),
        ]
        sections += [(f"peers.{name}", peer) for name, peer in self.peers.items()]
        for title, section in sections:
            lines.append(f"\n[{title}]")
            for f in dataclasses.fields(section):
                if f.name in ("name", "addresses"):
                    continue
                value = getattr(section, f.name)
                unset = f"# {f.name} is unset" + (
                    " (the checkpoint's model card decides)" if title == "selection" else "")
                lines.append(unset if value is None else f"{f.name} = {_toml_value(value)}")
            if title == "storage":
                lines.append(f"# database_url in effect: {self.storage.effective_database_url}")
            if title == "node":
                lines.append(f"# receive processes in effect: {self.node.effective_receive_processes}")
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return f'"{value.value}"'
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- validation helpers ---------------------------------------------------------------------------

def validate_ae_title(value: object) -> str:
    """Return ``value`` as an AE title or raise ``ValueError`` naming the rule it breaks.

    An AE title is 1 to 16 characters of the default repertoire, without backslash or control
    characters, and not only spaces (PS3.5 Table 6.2-1). Leading and trailing spaces are not
    significant and are removed.
    """
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    if len(value) > 16:
        raise ValueError(f"{value!r} is longer than 16 characters")
    if any(ord(c) < 0x20 or ord(c) > 0x7E or c == "\\" for c in value):
        raise ValueError(f"{value!r} holds a backslash, a control or a non-ASCII character")
    if not value.strip():
        raise ValueError(f"{value!r} is empty or only spaces")
    return value.strip()


class _Section:
    """Reads typed keys from one TOML table, collecting the file, section and key for errors."""

    def __init__(self, path: Path, name: str, table: Any, known: set[str]) -> None:
        self.path, self.name = path, name
        if not isinstance(table, dict):
            raise self.error(None, "must be a table")
        self.table = table
        for key in table:
            if key not in known:
                raise self.error(key, f"unknown key (known: {', '.join(sorted(known))})")

    def error(self, key: str | None, rule: str) -> ConfigError:
        where = f"[{self.name}]" + (f" {key}" if key else "")
        return ConfigError(f"{self.path}: {where}: {rule}")

    def get(self, key: str, kind: type, default: Any, check: Callable[[Any], Any] | None = None) -> Any:
        if key not in self.table:
            return default
        value = self.table[key]
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.error(key, f"{value!r} must be of type {kind.__name__}")
        if check is not None:
            try:
                value = check(value)
            except ValueError as exc:
                raise self.error(key, str(exc)) from None
        return value


def _node_id(value: str) -> str:
    if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
        raise ValueError(f"{value!r} is not 1-64 letters, digits, '.', '_' or '-' (a folder name)")
    return value


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"{value} is not a TCP port (1-65535)")
    return value


def _non_negative(value: T) -> T:
    if value < 0:  # type: ignore[operator]
        raise ValueError(f"{value} must not be negative")
    return value


def _positive(value: T) -> T:
    if value <= 0:  # type: ignore[operator]
        raise ValueError(f"{value} must be greater than zero")
    return value


def _pdu(value: int) -> int:
    if value != 0 and not 4096 <= value <= 2**32 - 1:
        raise ValueError(f"{value} must be 0 (unlimited) or between 4096 and 4294967295")
    return value


def _ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    return value


def _resolve(host: str) -> frozenset[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ValueError(f"host {host!r} does not resolve ({exc.strerror})") from None
    return frozenset(str(info[4][0]) for info in infos)


def _relative(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _readable_file(value: Path) -> Path:
    if not value.is_file() or not os.access(value, os.R_OK):
        raise ValueError(f"{str(value)!r} is not a readable file")
    return value


def _writable_root(value: Path) -> Path:
    try:
        value.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{str(value)!r} cannot be created ({exc.strerror})") from None
    if not os.access(value, os.W_OK | os.X_OK):
        raise ValueError(f"{str(value)!r} is not a writable directory")
    return value


# -- loading --------------------------------------------------------------------------------------

def default_config_path() -> Path:
    """``$MSVLM_NODE_CONFIG`` if set, else ``/etc/msvlm-node/config.toml``."""
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a configuration file.

    Parameters
    ----------
    path : path-like, optional
        The TOML file; default :func:`default_config_path`.

    Returns
    -------
    Config
        The validated configuration; relative paths are resolved against the file's folder.

    Raises
    ------
    ConfigError
        The file cannot be read or parsed, or a key breaks a rule; the message names the file,
        the key and the rule.
    """
    cfg_path = Path(path) if path is not None else default_config_path()
    try:
        raw = tomllib.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{cfg_path}: no such file (use -c FILE or ${CONFIG_ENV})") from None
    except OSError as exc:
        raise ConfigError(f"{cfg_path}: cannot be read ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{cfg_path}: not valid TOML ({exc})") from None
    return parse_config(raw, cfg_path)


def parse_config(raw: Mapping[str, Any], cfg_path: Path) -> Config:
    """Validate an already parsed TOML document; see :func:`load_config`."""
    base = cfg_path.resolve().parent
    known_sections = {"node", "tls", "peers", "storage", "completion", "model", "selection",
                      "report", "delivery", "worker", "audit", "metrics"}
    for name in raw:
        if name not in known_sections:
            raise ConfigError(f"{cfg_path}: [{name}]: unknown section (known: "
                              f"{', '.join(sorted(known_sections))})")

    d = NodeConfig()
    s = _Section(cfg_path, "node", raw.get("node", {}), {f.name for f in dataclasses.fields(NodeConfig)})
    node = NodeConfig(
        ae_title=s.get("ae_title", str, d.ae_title, validate_ae_title),
        bind_address=s.get("bind_address", str, d.bind_address, _ip),
        port=s.get("port", int, d.port, _port),
        accept_unknown_peers=s.get("accept_unknown_peers", bool, d.accept_unknown_peers),
        require_called_ae_title=s.get("require_called_ae_title", bool, d.require_called_ae_title),
        max_associations=s.get("max_associations", int, d.max_associations, _positive),
        max_associations_per_address=s.get("max_associations_per_address", int, 0, _positive),
        max_pdu_bytes=s.get("max_pdu_bytes", int, d.max_pdu_bytes, _pdu),
        acse_timeout_s=s.get("acse_timeout_s", float, d.acse_timeout_s, _positive),
        dimse_timeout_s=s.get("dimse_timeout_s", float, d.dimse_timeout_s, _positive),
        network_timeout_s=s.get("network_timeout_s", float, d.network_timeout_s, _positive),
        receive_processes=s.get("receive_processes", int, d.receive_processes, _non_negative),
        node_id=s.get("node_id", str, d.node_id, _node_id),
    )
    if node.max_associations_per_address > node.max_associations:
        raise s.error("max_associations_per_address",
                      f"must be at most max_associations ({node.max_associations})")
    if not node.max_associations_per_address:  # not set: 8, or all when fewer are allowed
        node = dataclasses.replace(node, max_associations_per_address=min(
            d.max_associations_per_address, node.max_associations))

    s = _Section(cfg_path, "tls", raw.get("tls", {}),
                 {"certificate", "private_key", "ca_certificates", "require_client_certificate"})
    as_file = lambda v: _readable_file(_relative(base, v))  # noqa: E731
    tls = TLSConfig(
        certificate=s.get("certificate", str, None, as_file),
        private_key=s.get("private_key", str, None, as_file),
        ca_certificates=s.get("ca_certificates", str, None, as_file),
        require_client_certificate=s.get("require_client_certificate", bool, False),
    )
    if tls.certificate and not tls.private_key:
        raise s.error("private_key", "is required when certificate is set")
    if tls.private_key and not tls.certificate:
        raise s.error("certificate", "is required when private_key is set")
    if tls.require_client_certificate and not tls.ca_certificates:
        raise s.error("ca_certificates", "is required when require_client_certificate is true")
    if (tls.ca_certificates or tls.require_client_certificate) and not tls.enabled:
        raise s.error("certificate", "is required to use TLS (ca_certificates is set)")

    peers_raw = raw.get("peers", {})
    if not isinstance(peers_raw, dict):
        raise ConfigError(f"{cfg_path}: [peers]: must hold tables [peers.NAME]")
    peers: dict[str, PeerConfig] = {}
    seen: dict[str, str] = {}
    for name, table in peers_raw.items():
        s = _Section(cfg_path, f"peers.{name}", table, {"ae_title", "host", "port", "allow_store"})
        if not name.replace("-", "").replace("_", "").isalnum():
            raise s.error(None, f"peer name {name!r} may hold only letters, digits, '-' and '_'")
        if name.lower() in seen:
            raise s.error(None, f"peer name {name!r} repeats [peers.{seen[name.lower()]}]")
        seen[name.lower()] = name
        for key in ("ae_title", "host", "port"):
            if key not in table:
                raise s.error(key, "is required")
        host = s.get("host", str, None)
        peers[name] = PeerConfig(
            name=name,
            ae_title=s.get("ae_title", str, None, validate_ae_title),
            host=host,
            port=s.get("port", int, None, _port),
            allow_store=s.get("allow_store", bool, True),
            addresses=s.get("host", str, None, _resolve),
        )

    d2 = StorageConfig()
    s = _Section(cfg_path, "storage", raw.get("storage", {}),
                 {"root", "database_url", "duplicate_policy", "min_free_bytes", "retention_days"})
    policies = [p.value for p in DuplicatePolicy]

    def policy(value: str) -> DuplicatePolicy:
        if value not in policies:
            raise ValueError(f"{value!r} is not one of {', '.join(policies)}")
        return DuplicatePolicy(value)

    storage = StorageConfig(
        root=s.get("root", str, d2.root, lambda v: _writable_root(_relative(base, v))),
        database_url=s.get("database_url", str, d2.database_url),
        duplicate_policy=s.get("duplicate_policy", str, d2.duplicate_policy, policy),
        min_free_bytes=s.get("min_free_bytes", int, d2.min_free_bytes, _non_negative),
        retention_days=s.get("retention_days", float, d2.retention_days, _non_negative),
    )
    if "root" not in raw.get("storage", {}):
        try:
            _writable_root(storage.root)
        except ValueError as exc:
            raise s.error("root", f"(default) {exc}") from None
    if storage.database_url:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError
        try:
            make_url(storage.database_url)
        except ArgumentError:
            raise s.error("database_url", f"{storage.database_url!r} is not an SQLAlchemy URL") from None

    s = _Section(cfg_path, "completion", raw.get("completion", {}),
                 {f.name for f in dataclasses.fields(CompletionConfig)})
    d_completion = CompletionConfig()
    completion = CompletionConfig(
        stable_age_s=s.get("stable_age_s", float, d_completion.stable_age_s, _positive),
        settle_s=s.get("settle_s", float, d_completion.settle_s, _non_negative),
        association_cue=s.get("association_cue", bool, d_completion.association_cue),
        expected_count_cue=s.get("expected_count_cue", bool, d_completion.expected_count_cue),
    )

    s = _Section(cfg_path, "audit", raw.get("audit", {}),
                 {f.name for f in dataclasses.fields(AuditConfig)})
    audit = AuditConfig(path=s.get("path", str, AuditConfig.path),
                        journal=s.get("journal", bool, AuditConfig.journal))

    s = _Section(cfg_path, "metrics", raw.get("metrics", {}), {"listen"})

    def listen(value: str) -> str:
        if value == "":
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is not \"host:port\" (or \"\" for no listener)")
        return value

    metrics = MetricsConfig(listen=s.get("listen", str, MetricsConfig.listen, listen))

    s = _Section(cfg_path, "model", raw.get("model", {}), {"checkpoint", "device", "threads"})

    def checkpoint(value: str) -> str:
        if value == "demo":
            if not (DEMO_CHECKPOINT / "model.safetensors").exists():
                raise ValueError("'demo': no demo checkpoint is shipped in this installation")
            return value
        path = _relative(base, value)
        if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
            raise ValueError(f"{str(path)!r} is not a checkpoint folder (model.safetensors, "
                             "config.json)")
        return str(path)

    def device(value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError(f"{value!r} is not auto, cpu, cuda or cuda:N")
        return value

    model = ModelConfig(checkpoint=s.get("checkpoint", str, "demo", checkpoint),
                        device=s.get("device", str, "auto", device),
                        threads=s.get("threads", int, 0, _non_negative))
    return Config(path=cfg_path, node=node, tls=tls, peers=peers, storage=storage,
                  completion=completion, model=model, audit=audit, metrics=metrics,
                  **_pipeline_sections(raw, cfg_path, peers))


def _strings(allowed: Sequence[str] | None = None, upper: bool = False) -> Callable[[Any], Any]:
    """A check for a list of strings (``"*"`` = any), each in ``allowed`` when given."""

    def check(value: list[Any]) -> tuple[str, ...]:
        if not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise ValueError(f"{value!r} must be a non-empty list of strings")
        out = tuple(v.strip().upper() if upper else v.strip() for v in value)
        if allowed is not None:
            bad = [v for v in out if v != "*" and v not in allowed]
            if bad:
                raise ValueError(f"{bad[0]!r} is not one of {', '.join(allowed)} or \"*\"")
        return out

    return check


def _pipeline_sections(raw: Mapping[str, Any], cfg_path: Path,
                       peers: Mapping[str, PeerConfig]) -> dict[str, Any]:
    """``[selection]``, ``[report]``, ``[delivery]`` and ``[worker]``."""
    from models.view import PHASES, PLANES

    d = SelectionConfig()
    s = _Section(cfg_path, "selection", raw.get("selection", {}),
                 {f.name for f in dataclasses.fields(SelectionConfig)})
    selection = SelectionConfig(
        modalities=s.get("modalities", list, None, _strings(upper=True)),
        body_parts=s.get("body_parts", list, None, _strings(upper=True)),
        planes=s.get("planes", list, d.planes, _strings(PLANES)),
        phases=s.get("phases", list, d.phases, _strings(PHASES)),
        min_slices=s.get("min_slices", int, d.min_slices, _positive),
        max_series=s.get("max_series", int, d.max_series, _positive),
        exclude_image_types=s.get("exclude_image_types", list, d.exclude_image_types,
                                  _strings(upper=True)),
    )

    def peer_names(value: list[Any]) -> tuple[str, ...]:
        if not all(isinstance(v, str) for v in value):
            raise ValueError(f"{value!r} must be a list of peer names")
        for name in value:
            if name not in peers:
                raise ValueError(f"{name!r} is not a configured peer (known: "
                                 f"{', '.join(sorted(peers)) or 'none'})")
        return tuple(value)

    s = _Section(cfg_path, "report", raw.get("report", {}), {"send_to", "send_back_to_sender", "pdf",
                                                           "key_images"})
    report = ReportConfig(send_to=s.get("send_to", list, (), peer_names),
                          send_back_to_sender=s.get("send_back_to_sender", bool, False),
                          pdf=s.get("pdf", bool, False),
                          key_images=s.get("key_images", bool, False))

    d2 = DeliveryConfig()
    s = _Section(cfg_path, "delivery", raw.get("delivery", {}),
                 {f.name for f in dataclasses.fields(DeliveryConfig)})
    delivery = DeliveryConfig(
        retry_delay_s=s.get("retry_delay_s", float, d2.retry_delay_s, _positive),
        max_retry_delay_s=s.get("max_retry_delay_s", float, d2.max_retry_delay_s, _positive),
        max_retries=s.get("max_retries", int, d2.max_retries, _non_negative))
    if delivery.max_retry_delay_s < delivery.retry_delay_s:
        raise s.error("max_retry_delay_s", f"{delivery.max_retry_delay_s} is less than "
                                           f"retry_delay_s {delivery.retry_delay_s}")

    d3 = WorkerConfig()
    s = _Section(cfg_path, "worker", raw.get("worker", {}),
                 {f.name for f in dataclasses.fields(WorkerConfig)})
    worker = WorkerConfig(processes=s.get("processes", int, d3.processes, _non_negative),
                          lease_s=s.get("lease_s", float, d3.lease_s, _positive),
                          max_attempts=s.get("max_attempts", int, d3.max_attempts, _positive),
                          stream=s.get("stream", bool, d3.stream))
    return dict(selection=selection, report=report, delivery=delivery, worker=worker)


RESTART_KEYS = {"node": ("bind_address", "port", "receive_processes", "node_id"),
                "storage": ("root", "database_url"), "worker": ("processes",),
                "metrics": ("listen",)}
"""Keys a reload leaves as they were (with the whole ``[tls]`` and ``[model]``): they need a
restart of ``serve`` (sockets, files, processes, the loaded model)."""


def reload_config(current: Config, quiet: bool = False) -> Config:
    """Read ``current.path`` again (``systemctl reload``, SIGHUP) and return what to apply:
    the new values, except the keys that need a restart, which are left as they were and (unless
    ``quiet``) logged as "needs a restart".

    Raises
    ------
    ConfigError
        The file is unreadable or breaks a rule (the message names file, key and rule); the
        running configuration stays.
    """
    new = load_config(current.path)
    kept: dict[str, Any] = {}
    changed: list[str] = []
    for section, keys in RESTART_KEYS.items():
        old_part, new_part = getattr(current, section), getattr(new, section)
        for key in keys:
            if getattr(old_part, key) != getattr(new_part, key):
                changed.append(f"[{section}] {key}")
        kept[section] = dataclasses.replace(new_part, **{k: getattr(old_part, k) for k in keys})
    for section in ("tls", "model"):
        if getattr(current, section) != getattr(new, section):
            changed.append(f"[{section}]")
        kept[section] = getattr(current, section)
    if changed and not quiet:
        logger.warning("%s: %s changed: needs a restart; left as it was", current.path,
                       ", ".join(changed))
    return dataclasses.replace(new, **kept)
