"""`pdorch up` refuses a cluster it cannot start, before starting anything: a message and exit 2."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pdorch.cli import main
from pdorch.launcher import port_is_free
from workers.models.cache_dir import CACHE_DIR_ENV


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prefill", "0"], "at least one prefill and one decode worker"),
        (["--decode", "-1"], "at least one prefill and one decode worker"),
        (["--port", "99999"], "--port 99999: ports are 1..65535"),
        (["--port", "-1"], "--port -1: ports are 1..65535"),
        (["--control-port", "8000"], "--port, --control-port must differ"),
        (["--control-port", "70000"], "--control-port 70000: ports are 1..65535"),
        (["--kv-mode", "centralized", "--broker-port", "5555"], "--broker-port must differ"),
        (["--model", "no-such-model"], "--model no-such-model: not a known model"),
        (["--engine", "vllm", "--model", "pdorch-reference"], "runs on the reference engine only"),
        (["--engine", "sim", "--vllm-tensor-parallel-size", "2"], "1 or more, with --engine vllm"),
        (["--vllm-tensor-parallel-size", "0"], "--vllm-tensor-parallel-size 0: 1 or more"),
    ],
)
def test_a_cluster_that_cannot_start_is_refused_up_front(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["up", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_model_that_is_not_downloaded_is_refused_with_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    assert main(["up", "--model", "smollm2-135m-instruct"]) == 2
    assert (
        "the model smollm2-135m-instruct is not downloaded yet: run `make model`" in capsys.readouterr().err
    )


def test_colocated_needs_no_decode_worker(capsys: pytest.CaptureFixture[str]) -> None:
    """With --colocated the workers serve whole requests: --decode does not count. (Refused here only
    for its port, so nothing starts.)"""
    assert main(["up", "--colocated", "--decode", "0", "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err


def test_a_simulated_cluster_needs_no_model_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """(Refused here only for its port, so nothing starts.)"""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    assert main(["up", "--engine", "sim", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "--port 70000" in err and "make model" not in err


def test_a_port_whose_connections_linger_in_time_wait_is_free_but_a_listening_one_is_not() -> None:
    """`pdorch up` just after a cluster stopped: its ports' last connections sit in TIME_WAIT for a
    minute, which the servers' own binds (SO_REUSEADDR) do not mind; the check must not either."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server's side closes first: the port's connection goes to TIME_WAIT
    client.close()
    assert not port_is_free(port)  # still listening
    listener.close()
    assert port_is_free(port)
    with socket.create_server(("127.0.0.1", port)):  # as the servers bind: it is free indeed
        pass
