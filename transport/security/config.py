"""How a process authenticates its ZeroMQ peers: the same settings for every pdorch process.

Each process reads them from ``PDORCH_KEY_FILE``, ``PDORCH_TRUSTED_KEYS``, ``PDORCH_KV_PAYLOAD``
and ``PDORCH_INSECURE`` (so a vLLM server beside an agent finds them too), then from its flags
(``--key-file`` ...); the scheduler also reads a ``security:`` block of its config file. A process
given neither keys nor ``insecure`` refuses to start: running open is always a written choice.
"""

from __future__ import annotations

import argparse
import enum
import os
from collections.abc import Mapping
from typing import Any

import msgspec

from transport.errors import ErrorCode, PdorchError

ENV = {
    "key_file": "PDORCH_KEY_FILE",
    "trusted_keys": "PDORCH_TRUSTED_KEYS",
    "kv_payload": "PDORCH_KV_PAYLOAD",
    "insecure": "PDORCH_INSECURE",
}


class KvPayload(enum.StrEnum):
    """Whether the KV plane encrypts what it carries (it always authenticates who connects)."""

    # CURVE, as the control plane: every byte authenticated and encrypted.
    ENCRYPTED = "encrypted"
    # PLAIN handshakes with the cluster's KV password, checked by ZAP; KV crosses the network as is.
    PLAINTEXT = "plaintext"


class SecurityConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # This process's own CURVE keypair (a `.key` file made by `pdorch keys generate`).
    key_file: str = ""
    # A directory of the `.pub` files of every party this process may talk to.
    trusted_keys: str = ""
    kv_payload: KvPayload = KvPayload.ENCRYPTED
    # No authentication at all (any process that reaches a port is obeyed). Never the default.
    insecure: bool = False

    def validate(self, prefix: str = "security.") -> None:
        if self.insecure:
            if self.key_file or self.trusted_keys:
                raise PdorchError(
                    ErrorCode.CONFIG, f"config key '{prefix}insecure' cannot be set together with keys"
                )
            return
        for name in ("key_file", "trusted_keys"):
            if not getattr(self, name):
                raise PdorchError(
                    ErrorCode.CONFIG,
                    f"config key '{prefix}{name}' is required (${ENV[name]}, --{name.replace('_', '-')}): "
                    "make keys with `pdorch keys generate DIR`, or set "
                    f"'{prefix}insecure' (${ENV['insecure']}=1, --insecure) to run without authentication",
                )


def from_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings present in the environment, as config fields."""
    env = os.environ if env is None else env
    found: dict[str, Any] = {}
    for field, variable in ENV.items():
        value = env.get(variable)
        if value is None or value == "":
            continue
        found[field] = value.strip().lower() in ("1", "true", "yes") if field == "insecure" else value
    return found


def build(fields: Mapping[str, Any], prefix: str = "security.") -> SecurityConfig:
    try:
        cfg = msgspec.convert(dict(fields), SecurityConfig, strict=False)
    except msgspec.ValidationError as e:
        raise PdorchError(ErrorCode.CONFIG, f"invalid config under '{prefix}': {e}") from None
    cfg.validate(prefix)
    return cfg


def add_arguments(p: argparse.ArgumentParser | Any) -> None:
    """The flags of every process (their defaults come from the environment)."""
    g = p.add_argument_group("authentication (defaults from $PDORCH_KEY_FILE, $PDORCH_TRUSTED_KEYS, ...)")
    g.add_argument("--key-file", help="this process's CURVE keypair (from `pdorch keys generate`)")
    g.add_argument("--trusted-keys", help="directory of the public keys (.pub) of the parties to trust")
    g.add_argument(
        "--kv-payload",
        choices=[k.value for k in KvPayload],
        help="KV plane: encrypted (CURVE, default) or plaintext (authenticated only; faster)",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="run without authentication: anyone who reaches a port is obeyed",
    )


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> SecurityConfig:
    """Environment first, then flags."""
    fields = from_env(env)
    for field in ENV:
        value = getattr(args, field, None)
        if value is not None:
            fields[field] = value
    return build(fields, prefix="")
