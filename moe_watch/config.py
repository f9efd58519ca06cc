"""Agent settings: defaults < YAML file < MOE_WATCH_* environment < command line.

pydantic-settings does the layering and validation. ``load_settings`` turns any validation
failure into ``ConfigError`` carrying one human line that names the setting and what is wrong;
the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

if TYPE_CHECKING:
    from moe_watch.sizing.plan import PlanFile

from moe_watch import limits
from moe_watch.thresholds import DEFAULT

ENGINE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
# The agent's port. Not 9400: that is dcgm-exporter's, and it runs on the same GPU nodes
# (docs/deploy.md "The port"). The Helm chart's `port` value and deploy/base follow this one.
DEFAULT_PORT = 9663
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]*):(?P<port>\d{1,5})$")


class ConfigError(Exception):
    """A setting is missing or invalid. ``str()`` is one line meant for a human; ``problems``
    has every problem found, one line each (the CLI prints them all)."""

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems or (message,)


class ExpertsConfig(BaseModel):
    """Where one engine's per-expert routed-token counts come from (docs/experts.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # plugin: files the moe-watch vLLM plugin writes (MOE_WATCH_EXPERTS_DIR of the engine);
    # sglang: dumps of SGLang's expert-distribution recorder (SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR).
    source: Literal["plugin", "sglang"] = "plugin"
    directory: Path
    top_k: int | None = Field(
        default=None, ge=1, le=limits.EXPERTS_PER_LAYER, description="experts per token (sglang)"
    )
    num_experts: int | None = Field(default=None, ge=1, le=limits.EXPERTS_PER_LAYER)
    ep_size: int = Field(
        default=1, ge=1, le=limits.EP_RANKS, description="expert-parallel ranks (sglang only)"
    )
    # For the EPLB what-if (docs/experts.md): the model's expert groups (DeepSeek-V3's n_group, 8)
    # and the nodes the engine's EP ranks span. vLLM's EPLB is hierarchical when the groups divide
    # by the nodes; 1 and 1 is its global policy.
    num_expert_groups: int = Field(default=1, ge=1, le=limits.EXPERTS_PER_LAYER)
    num_nodes: int = Field(default=1, ge=1, le=limits.EP_RANKS)
    # An engine whose workers span nodes (LeaderWorkerSet, DP+EP): the same id on every node's
    # agent. Those agents then also export this node's window counts under `engine_group`, and
    # recording rules rebuild the engine's expert signals from all nodes (docs/experts.md).
    engine_group: str | None = Field(default=None, pattern=ENGINE_ID_PATTERN)

    @model_validator(mode="after")
    def _sglang_needs_top_k(self) -> ExpertsConfig:
        if self.source == "sglang" and self.top_k is None:
            raise ValueError("top_k is required for source sglang (its dumps do not carry it)")
        return self


class TargetConfig(BaseModel):
    """One serving engine to scrape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=ENGINE_ID_PATTERN, description="Stable engine id (label `engine`).")
    url: str = Field(description="Base URL of the engine's HTTP server, e.g. http://127.0.0.1:8000")
    kind: Literal["auto", "vllm", "sglang"] = "auto"
    metrics_path: str = "/metrics"
    # GPUs this engine runs on (NVML indices). Unset: every GPU on the node when there is one
    # target; with several targets, GPUs nobody declares carry an empty `engine` label.
    gpus: tuple[int, ...] | None = None
    experts: ExpertsConfig | None = None
    # vLLM EPLB balancedness log lines (--enable-eplb with log_balancedness): a file to follow.
    eplb_log: Path | None = None
    # What the engine was sized for (docs/sizing.md): budget, headroom and drift against it.
    plan: Path | None = None

    # The plan file, read once while validating (the agent sizes the budget from it).
    _plan_file: PlanFile | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _load_plan(self) -> TargetConfig:
        if self.plan is not None:
            from moe_watch.sizing.plan import load_plan

            self._plan_file = load_plan(self.plan)  # PlanError (a ValueError) names file and line
        return self

    @property
    def plan_file(self) -> PlanFile | None:
        return self._plan_file

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_base_url(value)

    @field_validator("metrics_path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must start with '/', got {value[:100]!r}")
        if len(value) > 1024 or not _URL_PATH.match(value):
            raise ValueError(
                f"must be a URL path (no spaces, query or fragment), got {value[:100]!r}"
            )
        return value


# target URLs are validated where they enter. A base URL is scheme://host[:port]
# (a path prefix is allowed); credentials in it would be sent as basic auth and echoed into logs
# and /status, so they are refused, as are a query, a fragment and an invalid port.
_URL_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")


def check_base_url(value: str) -> str:
    from yarl import URL

    shown = re.sub(r"//[^/@]*@", "//***@", value)[:100]  # never echo a password

    if not re.match(r"^https?://[^/\s]+", value) or any(c.isspace() for c in value):
        raise ValueError(f"must be an http(s) URL such as http://127.0.0.1:8000, got {shown!r}")
    try:
        url = URL(value)
        port = url.port  # raises on a port that is not a number
    except (ValueError, TypeError):
        raise ValueError(f"not a valid URL: {shown!r}") from None
    if url.user is not None or url.password is not None:
        raise ValueError(
            "must not carry user:password@ (it would be echoed into logs and /status); "
            "put credentials in front of the engine instead"
        )
    if not url.host or url.query_string or url.fragment:
        raise ValueError(f"must be scheme://host[:port] without query or fragment, got {shown!r}")
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"port out of range in {shown!r}")
    return value.rstrip("/")


def parse_target(spec: str) -> TargetConfig:
    """``ID=URL`` (the command-line and env-var form) -> TargetConfig."""
    name, sep, url = spec.partition("=")
    if not sep or not name or not url:
        raise ValueError(f"expected ENGINE_ID=URL, got {spec!r}")
    return TargetConfig(name=name.strip(), url=url.strip())


class Settings(BaseSettings):
    """Everything the agent needs; see docs/configuration.md for the YAML form."""

    model_config = SettingsConfigDict(
        env_prefix="MOE_WATCH_",
        extra="forbid",
        validate_default=True,
    )

    targets: Annotated[
        tuple[TargetConfig, ...], NoDecode, Field(max_length=limits.TARGETS_PER_AGENT)
    ] = ()
    listen: str = f"0.0.0.0:{DEFAULT_PORT}"
    interval_seconds: float = Field(default=5.0, ge=0.05, le=300)  # a floor: no busy loop
    window_seconds: float = Field(default=300.0, gt=0, le=86_400)
    scrape_timeout_seconds: float = Field(default=3.0, gt=0, le=120)
    max_body_bytes: int = Field(default=limits.ENGINE_BODY_BYTES, ge=1024, le=1 << 30)
    # All engines' bodies held at once (sources/body_budget.py); past it the largest is dropped.
    max_body_bytes_in_flight: int = Field(default=limits.BODY_BYTES_IN_FLIGHT, ge=1024, le=1 << 32)
    # auto: read GPUs through NVML; without a driver the nvml source reports down, the agent runs on.
    nvml: Literal["auto", "off"] = "auto"
    nvml_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    # Kubernetes: find annotated serving pods on this node (docs/configuration.md). The node name
    # comes from the downward API (MOE_WATCH_NODE_NAME); the API server and credentials from
    # the pod's service account.
    discovery: bool = False
    node_name: str | None = None
    kube_api: str = "https://kubernetes.default.svc"
    # The kubelet pod-resources socket: GPU UUID -> pod/container without hostPID.
    pod_resources_socket: Path | None = None
    # Hot experts exported per engine (moe_watch_expert_hot_token_share), hottest first.
    expert_top_n: int = Field(default=4, ge=1, le=64)
    # Export every (layer, expert) counter (moe_watch_expert_tokens_total): 14,848 series for a
    # DeepSeek-V3 replica. Off by default; /experts always has the full matrix as JSON.
    expert_full_detail: bool = False
    # EPLB what-if (docs/experts.md): vLLM's EPLB placement on the window's load, for these
    # redundant-expert counts (unset: 0, EP size, 2 x EP size; at most 8, each 0-1023, vLLM's
    # limit), recomputed at most every eplb_whatif_interval_seconds (0: every cycle), with
    # eplb_whatif_target the balancedness the search for the smallest sufficient count aims at.
    eplb_whatif_redundant: tuple[int, ...] | None = Field(default=None, max_length=8)
    eplb_whatif_interval_seconds: float = Field(default=60.0, ge=0, le=3600)
    eplb_whatif_target: float = Field(default=DEFAULT.eplb_whatif_target, gt=0, le=1)
    # The batching curve (docs/experts.md, "The batching curve"): evidence halves every
    # half-life; a batch size needs min_bin_seconds of (aged) evidence to count; the knee keeps
    # ITL P95 within the SLO (by default the ITL P95 alert's threshold).
    batching_half_life_seconds: float = Field(default=6 * 3600.0, ge=60, le=30 * 86_400)
    batching_min_bin_seconds: float = Field(default=300.0, gt=0, le=86_400)
    batching_itl_p95_slo_seconds: float = Field(default=DEFAULT.itl_p95_seconds, gt=0, le=60)
    # Where the agent keeps what must survive a restart (the batching curves); unset: nothing
    # is kept (the chart mounts a hostPath at /var/lib/moe-watch).
    state_dir: Path | None = None
    # TLS and basic auth on the agent's endpoints (exporter-toolkit web config format); off by default.
    web_config_file: Path | None = None
    # bounds on the agent's own server, its basic auth and its shutdown
    # (docs/configuration.md, "Bounds"). Readers' bounds are declared in moe_watch/limits.py.
    server_max_connections: int = Field(default=limits.SERVER_CONNECTIONS, ge=1, le=65_536)
    server_probe_connections: int = Field(default=limits.PROBE_CONNECTIONS, ge=1, le=1024)
    server_idle_timeout_seconds: float = Field(default=15.0, gt=0, le=3600)
    server_header_timeout_seconds: float = Field(default=limits.HEADER_SECONDS, gt=0, le=300)
    server_write_timeout_seconds: float = Field(default=limits.WRITE_SECONDS, gt=0, le=3600)
    server_max_header_bytes: int = Field(default=limits.HEADER_BYTES, ge=1024, le=65_536)
    auth_workers: int = Field(default=2, ge=1, le=16)
    auth_max_pending: int = Field(default=16, ge=1, le=1024)
    shutdown_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("targets", mode="before")
    @classmethod
    def _targets_from_text(cls, value: Any) -> Any:
        # MOE_WATCH_TARGETS="a=http://..,b=http://.." or a JSON list; YAML gives dicts or strings.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                value = json.loads(text)
            else:
                value = [part for part in text.split(",") if part.strip()]
        if isinstance(value, (list, tuple)):
            return tuple(parse_target(v) if isinstance(v, str) else v for v in value)
        return value

    @field_validator("targets")
    @classmethod
    def _unique_names(cls, value: tuple[TargetConfig, ...]) -> tuple[TargetConfig, ...]:
        seen: set[str] = set()
        for target in value:
            if target.name in seen:
                raise ValueError(f"engine id {target.name!r} is used by two targets")
            seen.add(target.name)
        return value

    @model_validator(mode="after")
    def _discovery_needs_node(self) -> Settings:
        if self.discovery and not self.node_name:
            raise ValueError("discovery needs node_name (MOE_WATCH_NODE_NAME from spec.nodeName)")
        return self

    @field_validator("eplb_whatif_redundant")
    @classmethod
    def _check_redundant(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and any(not 0 <= count <= 1023 for count in value):
            raise ValueError("each redundant-expert count must be 0-1023 (vLLM's limit)")
        return value

    @field_validator("web_config_file")
    @classmethod
    def _check_web_config(cls, value: Path | None) -> Path | None:
        if value is not None:
            from moe_watch.serving.web_config import load_web_config

            load_web_config(value)  # WebConfigError (a ValueError) names the file and the problem
        return value

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        match = _HOST_PORT.match(value)
        if not match or not 0 <= int(match["port"]) <= 65535:
            raise ValueError(f"expected HOST:PORT such as 0.0.0.0:{DEFAULT_PORT}, got {value!r}")
        return value

    @property
    def listen_host(self) -> str:
        host = self.listen.rsplit(":", 1)[0].strip("[]")
        return host or "0.0.0.0"

    @property
    def listen_port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init kwargs carry the command line; the YAML file (if any) sits below the environment.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("yaml_file"):
            sources.append(YamlConfigSettingsSource(settings_cls))
        return tuple(sources)


def _settings_class(config_file: Path | None) -> type[Settings]:
    """Settings, or a subclass that also reads ``config_file`` (sources are built per class)."""
    if config_file is None:
        return Settings

    class FileSettings(Settings):
        model_config = SettingsConfigDict(yaml_file=config_file)

    return FileSettings


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from a YAML file, the environment and command-line overrides.

    Raises ``ConfigError`` with one line naming the setting and what is wrong.
    """
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file {config_file}: no such file")
        _check_yaml(config_file)
    cli = {key: value for key, value in overrides.items() if value is not None}
    try:
        return _settings_class(config_file)(**cli)
    except ValidationError as exc:
        problems = describe_validation_errors(exc, config_file)
        raise ConfigError(describe_validation_error(exc, config_file), problems) from None
    except ValueError as exc:  # e.g. JSON in MOE_WATCH_TARGETS that does not parse
        raise ConfigError(f"invalid setting: {exc}") from None


def _check_yaml(path: Path) -> None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = " ".join(str(getattr(exc, "problem", exc)).split())  # one line, always
        raise ConfigError(f"config file {where}: not valid YAML ({problem})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc})") from None
    except RecursionError:
        raise ConfigError(f"config file {path}: nested too deeply to be a settings file") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings at the top level")


def describe_validation_errors(
    exc: ValidationError, config_file: Path | None = None
) -> tuple[str, ...]:
    """Every error of a ValidationError, one line each: ``invalid setting 'x.y': what is wrong``."""
    where = f" (config file {config_file} or MOE_WATCH_* environment)" if config_file else ""
    lines = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"]) or "settings"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown setting (check the spelling; see docs/configuration.md)"
        message = " ".join(message.removeprefix("Value error, ").split())  # one line, always
        lines.append(f"invalid setting '{loc}'{where}: {message}")
    return tuple(lines)


def describe_validation_error(exc: ValidationError, config_file: Path | None = None) -> str:
    """The first error of a ValidationError as one line, counting the others."""
    first, *rest = describe_validation_errors(exc, config_file)
    suffix = f" (and {len(rest)} more problem{'s' if len(rest) > 1 else ''})" if rest else ""
    return first + suffix
