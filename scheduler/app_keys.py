"""The scheduler app's shared objects, one typed aiohttp ``AppKey`` each.

The pure parts (config, metrics, request inboxes, cluster state, admission, planner) are set when
the app is built; the others by the cleanup context that starts them (``scheduler/app.py``), so they
exist exactly while the app runs. Handlers read what they need.
"""

from __future__ import annotations

import zmq.asyncio
from aiohttp import web

from scheduler.admission.gate import AdmissionGate
from scheduler.cluster import Cluster
from scheduler.config import SchedulerConfig
from scheduler.flow import Orchestrator
from scheduler.http.connection_limits import ConnectionLimits
from scheduler.inbox import Inbox
from scheduler.kubernetes.runtime import KubernetesRuntime
from scheduler.lora.operations import AdapterOperations
from scheduler.metrics import Metrics
from scheduler.planner import Planner
from scheduler.tokenizer.registry import TokenizerRegistry
from transport.security import Security

# Set by build_app.
CONFIG = web.AppKey("config", SchedulerConfig)
METRICS = web.AppKey("metrics", Metrics)
INBOX = web.AppKey("inbox", Inbox)
CLUSTER = web.AppKey("cluster", Cluster)
ADMISSION = web.AppKey("admission", AdmissionGate)
PLANNER = web.AppKey("planner", Planner)
ADAPTERS = web.AppKey("adapters", AdapterOperations)
CONNECTIONS = web.AppKey("connections", ConnectionLimits)
# Set by the cleanup context that owns each.
TOKENIZERS = web.AppKey("tokenizers", TokenizerRegistry)
ZMQ_CONTEXT = web.AppKey("zmq_context", zmq.asyncio.Context)
SECURITY = web.AppKey("security", Security)
ORCHESTRATOR = web.AppKey("orchestrator", Orchestrator)
KUBERNETES = web.AppKey("kubernetes", KubernetesRuntime)
