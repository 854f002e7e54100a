"""Connecting to the Kubernetes API: in-cluster service account first, else a kubeconfig."""

from __future__ import annotations

from pathlib import Path

from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

from transport.errors import ErrorCode, PdorchError

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def load_api_client(kubeconfig: str = "") -> client.ApiClient:
    """An ``ApiClient`` for the configured kubeconfig, else in-cluster, else the default kubeconfig."""
    configuration = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        else:
            try:
                config.load_incluster_config(client_configuration=configuration)
            except ConfigException:
                config.load_kube_config(client_configuration=configuration)
    except (ConfigException, OSError, TypeError) as e:
        where = kubeconfig or "in-cluster service account or default kubeconfig"
        raise PdorchError(ErrorCode.CONFIG, f"cannot load Kubernetes credentials ({where}): {e}") from None
    return client.ApiClient(configuration)


def resolve_namespace(configured: str, service_account_file: Path = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """The configured namespace, else the pod's own (from its service account), else ``default``."""
    if configured:
        return configured
    try:
        own = service_account_file.read_text().strip()
    except OSError:
        own = ""
    return own or "default"
