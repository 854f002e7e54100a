"""List, then watch, the pods matching one label selector, in a thread of its own.

The official client blocks, so it runs here and hands every update to ``sink`` (which must be
thread-safe: discovery passes them to the event loop with ``call_soon_threadsafe``).

The loop: list (a full snapshot, and the resourceVersion to watch from) -> watch from there ->
when the watch ends (server timeout, read timeout) watch again from the last version seen.
A 410 Gone (the version is too old) -> list again at once. Any other failure (API error,
dropped connection, unreachable server) -> back off (exponential, capped) and list again.
Every blocking call has a timeout, and ``stop`` closes a running watch's socket, so the thread
ends promptly.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import urllib3
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from scheduler.kubernetes.pod_info import PodInfo, parse_pod
from transport.liveness import Backoff

log = logging.getLogger(__name__)

GONE = 410
# Extra read time beyond the server-side watch timeout before the client gives up on a quiet stream.
_READ_MARGIN_S = 5.0


class Relisted(msgspec.Struct, frozen=True):
    """A complete list of the selected pods (after start, a 410, or an error)."""

    pods: list[PodInfo]


class PodEvent(msgspec.Struct, frozen=True):
    event: str  # ADDED, MODIFIED, DELETED
    pod: PodInfo


WatchUpdate = Relisted | PodEvent


class _RawWatch(watch.Watch):
    # Hand events over as plain dicts: no model deserialization (faster, and never fails on a
    # field the client's models do not know).
    def get_return_type(self, func: Callable[..., Any]) -> None:
        return None


class PodWatcher:
    def __init__(
        self,
        core: client.CoreV1Api,
        namespace: str,
        label_selector: str,
        sink: Callable[[WatchUpdate], None],
        *,
        watch_timeout_s: float,
        request_timeout_s: float,
        backoff: Backoff,
        name: str = "pods",
    ) -> None:
        self._core = core
        self._namespace = namespace
        self._selector = label_selector
        self._sink = sink
        self._watch_timeout_s = watch_timeout_s
        self._request_timeout_s = request_timeout_s
        self._backoff = backoff
        self._stopping = threading.Event()
        self._watch: _RawWatch | None = None
        self._thread = threading.Thread(target=self._run, name=f"pdorch-watch-{name}", daemon=True)
        # True after a 410 until the next event: a second 410 in a row backs off.
        self._gone_again = False
        # Counters, for logs and tests.
        self.lists = 0
        self.failures = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end; a running watch is closed at once. Does not wait (see ``join``)."""
        self._stopping.set()
        current = self._watch
        if current is not None:
            current.stop()

    def join(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the thread to end; True if it did."""
        deadline = time.monotonic() + timeout_s
        while self._thread.is_alive():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # A watch request still waiting for its response headers when stop() ran had no
            # socket to close yet: close it as soon as it has one.
            current = self._watch
            if self._stopping.is_set() and current is not None:
                current.stop()
            self._thread.join(min(0.05, left))
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                version = self._list()
                self._backoff.reset()
                self._watch_from(version)
            except ApiException as e:
                if self._stopping.is_set():
                    return
                if e.status == GONE and not self._gone_again:
                    # Normal: the version we watch from is too old. List again at once, but only
                    # once in a row: a server answering 410 to every fresh list gets back-off.
                    log.info("pod watch %r expired (410 Gone): listing again", self._selector)
                    self._gone_again = True
                    continue
                self._fail(f"API error {e.status} {e.reason}")
            except Exception as e:  # network errors, bad JSON, a closed connection: all retried
                if self._stopping.is_set():
                    return
                self._fail(f"{type(e).__name__}: {e}")

    def _fail(self, what: str) -> None:
        self.failures += 1
        delay = self._backoff.next_delay()
        log.warning("pod list/watch %r failed (%s); retrying in %.1fs", self._selector, what, delay)
        self._stopping.wait(delay)

    def _list(self) -> str:
        response = self._core.list_namespaced_pod(
            self._namespace,
            label_selector=self._selector,
            _preload_content=False,
            _request_timeout=self._request_timeout_s,
        )
        try:
            body = json.loads(response.data)
        finally:
            response.release_conn()
        pods = []
        for item in body.get("items") or []:
            try:
                pods.append(parse_pod(item))
            except ValueError as e:
                log.warning("ignoring a pod object: %s", e)
        self.lists += 1
        self._sink(Relisted(pods))
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    def _watch_from(self, version: str) -> None:
        while not self._stopping.is_set():
            stream = _RawWatch()
            self._watch = stream
            if self._stopping.is_set():  # stop() ran before the watch was published
                return
            kwargs: dict[str, Any] = {
                "label_selector": self._selector,
                "timeout_seconds": max(1, int(self._watch_timeout_s)),
                "allow_watch_bookmarks": True,
                "_request_timeout": (self._request_timeout_s, self._watch_timeout_s + _READ_MARGIN_S),
            }
            if version:
                kwargs["resource_version"] = version
            try:
                for event in stream.stream(self._core.list_namespaced_pod, self._namespace, **kwargs):
                    if self._stopping.is_set():
                        return
                    version = self._handle(event) or version
            except urllib3.exceptions.ReadTimeoutError:
                # A quiet stream outlived the read timeout: watch again from the same version.
                # (A dropped connection raises something else, and goes through back-off.)
                if self._stopping.is_set():
                    return
            finally:
                self._watch = None

    def _handle(self, event: dict[str, Any]) -> str:
        kind = event.get("type")
        raw = event.get("raw_object") or {}
        meta = raw.get("metadata") or {}
        if kind == "BOOKMARK":
            return str(meta.get("resourceVersion") or "")
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            return ""
        try:
            pod = parse_pod(raw)
        except ValueError as e:
            log.warning("ignoring a pod event: %s", e)
            return ""
        self._sink(PodEvent(kind, pod))
        self._gone_again = False
        return pod.resource_version
