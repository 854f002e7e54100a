"""Authentication in tests: none, said explicitly, or a party of a local cluster."""

from pdorch.launcher import LocalCluster
from transport.security import Security
from transport.security import config as security_config

INSECURE = Security.insecure()


def party(cluster: LocalCluster, name: str) -> Security:
    """The keys of process ``name`` of ``cluster`` (made for it if it is new: a worker claiming its
    own name)."""
    env = {k: v for k, v in cluster.party_env(name).items() if k != "PDORCH_KV_PAYLOAD"}
    return Security.load(security_config.build(security_config.from_env(env)))
