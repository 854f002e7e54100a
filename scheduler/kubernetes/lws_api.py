"""The LeaderWorkerSet scale subresource, through the official client (blocking calls).

Reading and patching ``.../leaderworkersets/<name>/scale`` (rather than the LWS object) needs
only the ``leaderworkersets/scale`` RBAC verbs and never touches the rest of the spec.
"""

from __future__ import annotations

from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException

from transport.errors import ErrorCode, PdorchError

LWS_GROUP = "leaderworkerset.x-k8s.io"
LWS_VERSION = "v1"
LWS_PLURAL = "leaderworkersets"


class LwsScaleApi:
    def __init__(self, api_client: client.ApiClient, namespace: str, request_timeout_s: float) -> None:
        self._api = client.CustomObjectsApi(api_client)
        self._namespace = namespace
        self._timeout = request_timeout_s

    def get_replicas(self, lws_name: str) -> int:
        """``spec.replicas`` of the LWS (the desired number of groups)."""
        what = f"reading the scale of LWS {self._namespace}/{lws_name}"
        try:
            scale: Any = self._api.get_namespaced_custom_object_scale(
                LWS_GROUP, LWS_VERSION, self._namespace, LWS_PLURAL, lws_name, _request_timeout=self._timeout
            )
        except (ApiException, urllib3.exceptions.HTTPError) as e:
            raise _api_error(what, e) from None
        replicas = (scale.get("spec") or {}).get("replicas") if isinstance(scale, dict) else None
        if not isinstance(replicas, int):
            raise PdorchError(ErrorCode.INTERNAL, f"{what}: the answer has no spec.replicas")
        return replicas

    def set_replicas(self, lws_name: str, replicas: int) -> None:
        """Merge-patch ``spec.replicas`` through the scale subresource."""
        what = f"scaling LWS {self._namespace}/{lws_name} to {replicas}"
        try:
            self._api.patch_namespaced_custom_object_scale(
                LWS_GROUP,
                LWS_VERSION,
                self._namespace,
                LWS_PLURAL,
                lws_name,
                {"spec": {"replicas": replicas}},
                _request_timeout=self._timeout,
            )
        except (ApiException, urllib3.exceptions.HTTPError) as e:
            raise _api_error(what, e) from None


def _api_error(what: str, e: Exception) -> PdorchError:
    if isinstance(e, ApiException):
        return PdorchError(ErrorCode.INTERNAL, f"{what}: API answered {e.status} {e.reason}")
    return PdorchError(ErrorCode.INTERNAL, f"{what}: {type(e).__name__}: {e}")
