"""pdorch on Kubernetes: pod discovery (watch the LWS pools' pods) and autoscaling (patch LWS scale).

Entry point for the scheduler: :func:`scheduler.kubernetes.runtime.kubernetes_runtime`, given a
:class:`~scheduler.kubernetes.config.KubernetesConfig` (the ``kubernetes:`` config section), the
worker registry as a :class:`~scheduler.kubernetes.directory.WorkerDirectory`, and a source of
:class:`~scheduler.kubernetes.signals.PoolSignals`. Deployment guide: ``docs/kubernetes.md``.

- ``config``: the config Structs, validated with the full key in every error;
- ``discovery`` (+ ``pod_watcher``, ``pool_membership``, ``pod_info``): pods -> registry calls;
- ``autoscaler`` (+ ``scaling_policy``, pure; ``lws_api``): load -> LWS scale, draining first;
- ``drain_reasons``: who holds a worker drained; ``api_client``: credentials and namespace.
"""
