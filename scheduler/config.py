"""The scheduler's typed configuration: defaults, then a YAML file, then PDORCH_* env, then flags.

Every field is validated on load; an error names the bad key and says what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from scheduler.admission.policy import AdmissionPolicy
from scheduler.kubernetes.config import KubernetesConfig
from scheduler.placement.config import PlacementConfig
from scheduler.prediction.output_length import PredictorConfig
from scheduler.slo_window import POOL_PHASE, SloConfig, SloPhase, target_key
from transport.errors import ErrorCode, PdorchError
from transport.messages import KvMode
from transport.security import SecurityConfig
from transport.security import config as security_config


class HttpLimits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What one HTTP client can hold of the scheduler (``http:`` in the config file)."""

    # A request's headers must arrive whole within this of their first byte (of the connection's
    # opening, for its first request), else the connection is closed.
    header_timeout_s: float = 15.0
    # A keep-alive connection idle between requests is closed after this. Keep it above the idle
    # timeout of any proxy in front for its upstream connections, or the proxy may send a request on
    # a connection the scheduler is closing (AWS ALB 60 s, Google Cloud's load balancers 600 s; Envoy
    # keeps them an hour unless its upstream idle_timeout is set lower).
    idle_timeout_s: float = 620.0
    # A request's body must arrive within this of its headers (else 408).
    body_timeout_s: float = 30.0
    # A client that takes less than 16 KiB of its answer in this long (the connection's buffers
    # full) has its connection aborted, and its request ends as if it had hung up (nginx's
    # send_timeout, with a minimum rate).
    write_stall_timeout_s: float = 60.0
    # Open connections from one client address (0: no limit; behind a proxy every client has its
    # address, so raise it there or limit at the proxy).
    max_connections_per_client: int = 256
    # Open connections in all; more are answered 503 and closed.
    max_connections: int = 2048
    # Nesting of arrays and objects in a request body.
    max_json_depth: int = 32


class LoraConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """LoRA adapters registered at run time (``lora:`` in the config file)."""

    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (off: they answer 404, as vLLM's do
    # without VLLM_ALLOW_RUNTIME_LORA_UPDATING). Workers also load only from their --lora-root.
    runtime_updates: bool = False
    # Bearer keys allowed to load and unload adapters (empty: any key /v1 accepts).
    admin_keys: list[str] = []
    # How long an operation waits for the workers' answers (reading an adapter takes a while).
    timeout_s: float = 60.0


class SchedulerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # HTTP front end.
    host: str = "127.0.0.1"
    port: int = 8000
    # ZeroMQ control plane: the scheduler binds a ROUTER here; agents connect DEALERs.
    control_bind: str = "tcp://127.0.0.1:5555"
    # KV handoff: "p2p" (prefill agent -> decode agent) or "centralized" (through kv_broker).
    kv_mode: KvMode = KvMode.P2P
    kv_broker: str = ""
    # Serve each request on one 'both' worker without a KV handoff (for comparison).
    colocated: bool = False
    heartbeat_interval_s: float = 0.5
    heartbeat_liveness: int = 4
    # Longest a request waits in the admission queue for room (then 429 with Retry-After).
    queue_timeout_s: float = 30.0
    # Limits on one request.
    max_prompt_tokens: int = 32768
    max_tokens_limit: int = 8192
    default_max_tokens: int = 16
    max_body_bytes: int = 8 * 1024 * 1024
    # Deadlines: no token for this long after dispatch / between tokens fails the request.
    first_token_timeout_s: float = 60.0
    token_timeout_s: float = 30.0
    request_timeout_s: float = 600.0
    # Once prefill has answered, its KV is computed and on the wire: a handoff with no KV arriving
    # for this long, plus one second per GB of KV, is stalled (the decode side says KvArriving about
    # once a second while it receives; with an engine that does not, this bounds the whole handoff).
    kv_handoff_timeout_s: float = 10.0
    # After a p2p handoff to a decode worker does not land (it timed out or was cut short on the
    # way: e.g. the KV network to that worker is down while its control connection is not), no
    # handoff goes to that worker for this long, doubling while failures repeat (up to 60 s, or
    # this if longer), until one lands there again.
    kv_path_backoff_s: float = 5.0
    # Attempts at one request: when a worker it depends on dies, stalls (no progress within the
    # deadlines above) or fails it, the request moves to other workers from the tokens it has.
    max_attempts: int = 4
    # Centralized mode: after a handoff through the broker fails, handoffs go peer to peer for
    # this long (doubling while failures repeat, up to 30 s), then the broker is tried again.
    kv_broker_backoff_s: float = 1.0
    # Bearer tokens accepted on /v1 (empty: no auth). The key also names the tenant.
    api_keys: list[str] = []
    # CURVE keys of the ZeroMQ planes (also from PDORCH_KEY_FILE, PDORCH_TRUSTED_KEYS,
    # PDORCH_KV_PAYLOAD, PDORCH_INSECURE, which workers and the broker read too).
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)
    http: HttpLimits = msgspec.field(default_factory=HttpLimits)
    # Where jobs go: by default the `slo` handler, the policy the simulator measures (each request to
    # the pair with the most headroom on its predicted TTFT and TPOT; objectives from `slo` or the
    # request's headers). Without objectives every request is split onto the pair predicted fastest.
    placement: PlacementConfig = msgspec.field(default_factory=PlacementConfig)
    # The bounded fair-share queue in front of placement (tenant = API key).
    admission: AdmissionPolicy = msgspec.field(default_factory=AdmissionPolicy)
    # The online output-length predictor that sizes KV reservations.
    predictor: PredictorConfig = msgspec.field(default_factory=PredictorConfig)
    # Latency objectives: finished requests are judged against them (the share that met them is the
    # autoscaler's SLO signal and the pdorch_slo_attainment metric).
    slo: SloConfig = msgspec.field(default_factory=SloConfig)
    # Pod discovery and autoscaling of LeaderWorkerSet pools (both off unless enabled).
    kubernetes: KubernetesConfig = msgspec.field(default_factory=KubernetesConfig)
    lora: LoraConfig = msgspec.field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        _check(0 < self.port < 65536, "port", "must be 1..65535")
        _check(self.heartbeat_interval_s > 0, "heartbeat_interval_s", "must be > 0")
        _check(self.heartbeat_liveness >= 2, "heartbeat_liveness", "must be >= 2")
        _check(self.max_attempts >= 1, "max_attempts", "must be >= 1")
        for name in ("max_prompt_tokens", "max_tokens_limit", "default_max_tokens"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        for name in (
            "queue_timeout_s",
            "first_token_timeout_s",
            "token_timeout_s",
            "request_timeout_s",
            "kv_handoff_timeout_s",
            "kv_broker_backoff_s",
            "kv_path_backoff_s",
        ):
            _check(getattr(self, name) > 0, name, "must be > 0")
        _check(self.lora.timeout_s > 0, "lora.timeout_s", "must be > 0")
        # An empty key would match a request without one (e.g. from an empty Secret value).
        for name, keys in (("api_keys", self.api_keys), ("lora.admin_keys", self.lora.admin_keys)):
            _check(all(k.strip() for k in keys), name, "must not hold an empty key")
        _check(
            self.kv_mode != "centralized" or bool(self.kv_broker),
            "kv_broker",
            "is required with kv_mode centralized",
        )
        self._check_http()
        self.security.validate()
        self._check_slo()
        self.admission.validate()
        self.predictor.validate()
        # Building a placer checks plugin names, weights and parameters (pure and cheap).
        from scheduler.placement.framework import Placer

        Placer(self.placement)

    def _check_http(self) -> None:
        http = self.http
        for name in ("header_timeout_s", "body_timeout_s", "idle_timeout_s", "write_stall_timeout_s"):
            _check(getattr(http, name) > 0, f"http.{name}", "must be > 0")
        _check(http.max_connections_per_client >= 0, "http.max_connections_per_client", "must be >= 0")
        _check(http.max_connections >= 1, "http.max_connections", "must be >= 1")
        _check(http.max_json_depth >= 4, "http.max_json_depth", "must be >= 4 (requests nest that deep)")
        _check(self.max_body_bytes >= 1024, "max_body_bytes", "must be >= 1024")

    def _check_slo(self) -> None:
        slo = self.slo
        for phase in SloPhase:
            key = target_key(phase)
            _check(getattr(slo, key) >= 0, f"slo.{key}", "must be >= 0 (0 = not measured)")
        _check(slo.window_s > 0, "slo.window_s", "must be > 0")
        _check(slo.min_requests >= 1, "slo.min_requests", "must be >= 1")
        # A pool's SLO guard reads the attainment of its own phase; without that phase's target it
        # would never see one and silently do nothing.
        for pool, cfg in self.kubernetes.pools().items():
            key = target_key(POOL_PHASE[pool])
            if cfg.autoscaling.min_slo_attainment > 0:
                _check(
                    getattr(slo, key) > 0,
                    f"slo.{key}",
                    f"must be > 0 when kubernetes.{pool}.autoscaling.min_slo_attainment is set "
                    f"(the {pool} pool's SLO guard is judged on it)",
                )


def _check(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise PdorchError(ErrorCode.CONFIG, f"config key {key!r} {what}")


def _parse_env_value(raw: str) -> Any:
    # Env values are YAML scalars/lists, so PDORCH_PORT=9000 is an int and PDORCH_API_KEYS=[a,b] a list.
    try:
        return msgspec.yaml.decode(raw.encode())
    except msgspec.DecodeError:
        return raw


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> SchedulerConfig:
    """Build the config from a YAML file, ``PDORCH_<KEY>`` environment variables and overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise PdorchError(ErrorCode.CONFIG, f"cannot read config file {path}: {e.strerror}") from None
        try:
            loaded = msgspec.yaml.decode(raw) or {}
        except msgspec.DecodeError as e:
            raise PdorchError(ErrorCode.CONFIG, f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise PdorchError(ErrorCode.CONFIG, f"config file {path} must hold a mapping")
        data.update(loaded)
    fields = set(SchedulerConfig.__struct_fields__)
    # A string setting is taken as written (a token of digits must not turn into a number).
    text_fields = {f.name for f in msgspec.structs.fields(SchedulerConfig) if f.type is str}
    for key, value in (os.environ if env is None else env).items():
        name = key[7:].lower()
        if key.startswith("PDORCH_") and name in fields:
            parsed = value if name in text_fields else _parse_env_value(value)
            if isinstance(parsed, dict) and isinstance(data.get(name), dict):
                parsed = {**data[name], **parsed}  # a section's keys from env over the file's
            data[name] = parsed
    env_security = security_config.from_env(os.environ if env is None else env)
    if env_security:
        file_security = data.get("security")
        data["security"] = {**(file_security if isinstance(file_security, dict) else {}), **env_security}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return msgspec.convert(data, SchedulerConfig, strict=False)
    except msgspec.ValidationError as e:
        raise PdorchError(ErrorCode.CONFIG, f"invalid config: {e}") from None
