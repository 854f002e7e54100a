"""Key files, the trusted set, the ZAP decision and the security settings, table-driven."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from zmq.utils import z85

from transport.errors import ErrorCode, PdorchError
from transport.security import KeyKind, KvPayload
from transport.security import config as security_config
from transport.security.key_set import KeySet
from transport.security.keys import generate, read_keypair, read_public, write_keypair, write_public
from transport.security.trusted import TrustedKeys
from transport.security.zap import Plane, decide

# ---------------------------------------------------------------------------- key files


def test_a_keypair_round_trips_and_its_secret_file_is_private(tmp_path: Path) -> None:
    keys = generate("decode-0", KeyKind.WORKER)
    secret_path, public_path = write_keypair(keys, tmp_path)
    assert secret_path.stat().st_mode & 0o777 == 0o600
    assert read_keypair(secret_path) == keys
    assert read_public(public_path) == keys.identity
    assert "secret" not in public_path.read_text()
    assert keys.identity.claims == ("decode-0",)  # a worker key claims its own name by default


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda t: t.replace("kind = worker", "kind = admin"), "'kind' must be one of"),
        (lambda t: t.replace("name = w", "name = ../etc"), "'name'"),
        (lambda t: t + "garbage line\n", "expected 'field = value'"),
        (lambda t: t.replace("public = ", "public = x"), "40-character Z85"),
        (lambda t: t.split("secret = ")[0] + "secret = " + "~" * 40 + "\n", "'secret'"),
    ],
)
def test_a_malformed_key_file_names_the_problem(tmp_path: Path, mutate, needle: str) -> None:  # type: ignore[no-untyped-def]
    secret_path, _ = write_keypair(generate("w", KeyKind.WORKER), tmp_path)
    secret_path.write_text(mutate(secret_path.read_text()))
    with pytest.raises(PdorchError) as e:
        read_keypair(secret_path)
    assert (
        e.value.code is ErrorCode.CONFIG and needle in e.value.message and str(secret_path) in e.value.message
    )


def test_a_public_key_that_is_not_the_secret_ones_is_refused(tmp_path: Path) -> None:
    secret_path, _ = write_keypair(generate("w", KeyKind.WORKER), tmp_path)
    other = generate("x", KeyKind.WORKER).public
    text = "\n".join(
        f"public = {other}" if line.startswith("public") else line
        for line in secret_path.read_text().splitlines()
    )
    secret_path.write_text(text + "\n")
    with pytest.raises(PdorchError, match="does not belong"):
        read_keypair(secret_path)


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_a_secret_key_file_open_to_others_is_refused(tmp_path: Path) -> None:
    secret_path, _ = write_keypair(generate("w", KeyKind.WORKER), tmp_path)
    secret_path.chmod(0o640)
    with pytest.raises(PdorchError, match="chmod 600"):
        read_keypair(secret_path)


@pytest.mark.parametrize(
    "claims, worker_id, allowed",
    [
        (("decode-0",), "decode-0", True),
        (("decode-0",), "decode-1", False),
        (("pdorch-decode-*",), "pdorch-decode-3", True),
        (("pdorch-decode-*",), "pdorch-prefill-3", False),
        (("a", "b-*"), "b-7", True),
    ],
)
def test_a_worker_key_claims_the_ids_of_its_patterns(
    claims: tuple[str, ...], worker_id: str, allowed: bool
) -> None:
    assert generate("k", KeyKind.WORKER, claims).identity.may_claim(worker_id) is allowed


def test_only_worker_keys_claim_worker_ids() -> None:
    assert not generate("scheduler", KeyKind.SCHEDULER, ("*",)).identity.may_claim("anything")


# ---------------------------------------------------------------------------- the trusted set


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_trusted_set_follows_its_directory(tmp_path: Path) -> None:
    clock = Clock()
    keys = KeySet.create(tmp_path, {"a": ()})
    trusted = TrustedKeys(keys.trusted_dir, clock)
    a = trusted.by_name("a")
    assert a is not None and trusted.by_public(a.public) == a
    # A new key is admitted at once: an unknown key makes the directory be read again.
    clock.now += 0.2
    b = keys.add("b", KeyKind.WORKER)
    assert trusted.by_public(b.public) == b.identity
    # A revoked key stops being trusted within a second.
    keys.revoke("a")
    clock.now += 0.5
    assert trusted.by_name("a") is not None  # not looked at again yet
    clock.now += 0.6
    assert trusted.by_name("a") is None and trusted.by_name("b") is not None


def test_a_broken_key_file_does_not_hold_back_the_others(tmp_path: Path) -> None:
    clock = Clock()
    keys = KeySet.create(tmp_path, {"a": (), "b": ()})
    trusted = TrustedKeys(keys.trusted_dir, clock)
    (keys.trusted_dir / "a.pub").write_text("this is not a key\n")
    keys.revoke("b")
    clock.now += 2
    assert trusted.by_name("a") is None and trusted.by_name("b") is None
    assert trusted.by_name("scheduler") is not None


def test_two_keys_under_one_name_are_not_both_trusted(tmp_path: Path) -> None:
    keys = KeySet.create(tmp_path, {"a": ()})
    impostor = generate("a", KeyKind.WORKER)
    write_public(impostor.identity, keys.trusted_dir / "z-a.pub")
    trusted = TrustedKeys(keys.trusted_dir)
    a = trusted.by_name("a")
    assert a is not None and a.public != impostor.public
    assert trusted.by_public(impostor.public) is None


def test_clients_pin_the_one_key_of_a_kind(tmp_path: Path) -> None:
    keys = KeySet.create(tmp_path, {})
    trusted = TrustedKeys(keys.trusted_dir)
    assert trusted.only(KeyKind.SCHEDULER).name == "scheduler"
    keys.revoke("kv-broker")
    with pytest.raises(PdorchError, match="need exactly 1"):
        TrustedKeys(keys.trusted_dir).only(KeyKind.KV_BROKER)


def test_the_kv_password_must_be_long(tmp_path: Path) -> None:
    keys = KeySet.create(tmp_path, {})
    assert len(TrustedKeys(keys.trusted_dir).kv_password()) >= 32
    (keys.trusted_dir / "kv.password").write_text("short\n")
    with pytest.raises(PdorchError, match="at least 32"):
        TrustedKeys(keys.trusted_dir).kv_password()


# ---------------------------------------------------------------------------- the ZAP decision


@pytest.fixture
def trusted(tmp_path: Path) -> TrustedKeys:
    return TrustedKeys(KeySet.create(tmp_path, {"w": ()}).trusted_dir)


def _curve(trusted: TrustedKeys, name: str) -> list[bytes]:
    key = trusted.by_name(name)
    assert key is not None
    return [z85.decode(key.public)]


@pytest.mark.parametrize(
    "who, plane, allowed, user_id",
    [
        ("w", Plane.CONTROL, True, "w"),
        ("w", Plane.KV, True, "w"),
        ("scheduler", Plane.KV, True, "scheduler"),  # the broker monitor's pings
        ("scheduler", Plane.CONTROL, False, ""),  # only workers register
        ("kv-broker", Plane.CONTROL, False, ""),
        ("kv-broker", Plane.KV, False, ""),
    ],
)
def test_each_plane_admits_its_kinds_of_keys(
    trusted: TrustedKeys, who: str, plane: Plane, allowed: bool, user_id: str
) -> None:
    verdict = decide(trusted, plane.value, b"CURVE", _curve(trusted, who), "")
    assert (verdict.allowed, verdict.user_id) == (allowed, user_id)


@pytest.mark.parametrize(
    "domain, mechanism, credentials, reason",
    [
        ("pdorch-control", b"CURVE", [b"\x01" * 32], "unknown key"),
        ("pdorch-control", b"CURVE", [b"short"], "not accepted"),
        ("pdorch-control", b"NULL", [], "not accepted"),
        ("somewhere-else", b"CURVE", [b"\x01" * 32], "unknown domain"),
        ("pdorch-kv", b"PLAIN", [b"w", b"wrong password, long enough to be one"], "wrong KV password"),
        ("pdorch-control", b"PLAIN", [b"w", b"p" * 40], "not accepted"),  # PLAIN: the KV plane only
    ],
)
def test_strangers_are_refused(
    trusted: TrustedKeys, domain: str, mechanism: bytes, credentials: list[bytes], reason: str
) -> None:
    verdict = decide(trusted, domain, mechanism, credentials, "p" * 40)
    assert not verdict.allowed and reason in verdict.reason and verdict.user_id == ""


def test_plain_admits_trusted_names_with_the_kv_password(trusted: TrustedKeys) -> None:
    password = "p" * 40
    assert decide(trusted, "pdorch-kv", b"PLAIN", [b"w", password.encode()], password).user_id == "w"
    verdict = decide(trusted, "pdorch-kv", b"PLAIN", [b"nobody", password.encode()], password)
    assert not verdict.allowed
    # Without a KV password configured, PLAIN is never accepted.
    assert not decide(trusted, "pdorch-kv", b"PLAIN", [b"w", b""], "").allowed


# ---------------------------------------------------------------------------- settings


def test_settings_come_from_the_environment_then_flags() -> None:
    env = {"PDORCH_KEY_FILE": "/k/w.key", "PDORCH_TRUSTED_KEYS": "/t", "PDORCH_KV_PAYLOAD": "plaintext"}
    cfg = security_config.build(security_config.from_env(env))
    assert (cfg.key_file, cfg.trusted_keys, cfg.kv_payload) == ("/k/w.key", "/t", KvPayload.PLAINTEXT)
    assert security_config.build(security_config.from_env({"PDORCH_INSECURE": "1"})).insecure


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({}, "'key_file' is required"),
        ({"key_file": "/k"}, "'trusted_keys' is required"),
        ({"insecure": True, "trusted_keys": "/t"}, "cannot be set together"),
        ({"key_file": "/k", "trusted_keys": "/t", "kv_payload": "zip"}, "kv_payload"),
    ],
)
def test_settings_errors_name_the_key(fields: dict[str, object], needle: str) -> None:
    with pytest.raises(PdorchError) as e:
        security_config.build(fields, prefix="")
    assert e.value.code is ErrorCode.CONFIG and needle in e.value.message
