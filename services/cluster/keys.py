"""Every etcd key meshserve writes is built and parsed here (DESIGN §4).

Layout under the prefix (default ``/meshserve/v1/``)::

    models/<model>                 ModelSpec
    nodes/<node>                   NodeStatus        (agent's lease)
    cordons/<node>                 NodeCordon        (an operator: meshserve node cordon/drain)
    health_clears/<node>           DeviceHealthClear (an operator: node uncordon --device)
    replicas/<model>/<node>        ReplicaStatus     (agent's lease)
    placements/<node>/<model>      Placement         (written by the leader, fenced)
    election/scheduler/<lease>     SchedulerCandidate (candidate's lease)
    demand/<router>                RouterDemand      (router's lease)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "/meshserve/v1/"

# Names become single key segments: no "/" and nothing that needs escaping.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def valid_name(name: str) -> bool:
    """True when ``name`` can be a model or node name (one key segment)."""
    return bool(_NAME.match(name))


def check_name(kind: str, name: str) -> str:
    if not valid_name(name):
        raise ValueError(
            f"invalid {kind} name {name!r}: use 1-128 letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class Keyspace:
    """Builds and parses keys below one prefix. Keys and prefixes are bytes, as etcd takes them."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or not self.prefix.endswith("/"):
            raise ValueError(f"keyspace prefix must start and end with '/': {self.prefix!r}")

    def _key(self, *parts: str) -> bytes:
        return (self.prefix + "/".join(parts)).encode()

    # models/<model>
    def model(self, model: str) -> bytes:
        return self._key("models", check_name("model", model))

    def models(self) -> bytes:
        return self._key("models", "")

    # nodes/<node>
    def node(self, node: str) -> bytes:
        return self._key("nodes", check_name("node", node))

    def nodes(self) -> bytes:
        return self._key("nodes", "")

    # cordons/<node>: an operator's cordon or drain of a node
    def cordon(self, node: str) -> bytes:
        return self._key("cordons", check_name("node", node))

    def cordons(self) -> bytes:
        return self._key("cordons", "")

    # health_clears/<node>: an operator's clearing of a device's health history
    def health_clear(self, node: str) -> bytes:
        return self._key("health_clears", check_name("node", node))

    # replicas/<model>/<node>
    def replica(self, model: str, node: str) -> bytes:
        return self._key("replicas", check_name("model", model), check_name("node", node))

    def replicas(self) -> bytes:
        return self._key("replicas", "")

    # placements/<node>/<model>
    def placement(self, node: str, model: str) -> bytes:
        return self._key("placements", check_name("node", node), check_name("model", model))

    def placements(self, node: str | None = None) -> bytes:
        if node is None:
            return self._key("placements", "")
        return self._key("placements", check_name("node", node), "")

    # election/scheduler/<lease hex>
    def election(self) -> bytes:
        return self._key("election", "scheduler", "")

    # demand/<router>
    def demand(self, router: str) -> bytes:
        return self._key("demand", check_name("router", router))

    def demands(self) -> bytes:
        return self._key("demand", "")

    # routes/<name>: a public name's route (RouteSpec), `meshserve route apply`
    def route(self, name: str) -> bytes:
        return self._key("routes", check_name("route", name))

    def routes(self) -> bytes:
        return self._key("routes", "")

    # config/tenants: the tenants document (TenantsDocument) every router reads
    def tenants(self) -> bytes:
        return self._key("config", "tenants")

    def parse(self, key: bytes) -> tuple[str, ...]:
        """Splits a key into its kind and names: ``("replicas", model, node)``.

        Raises ValueError for a key outside the prefix or of unknown shape.
        """
        text = key.decode()
        if not text.startswith(self.prefix):
            raise ValueError(f"key {text!r} is outside prefix {self.prefix!r}")
        parts = tuple(text[len(self.prefix) :].split("/"))
        shapes = {
            "models": 2,
            "nodes": 2,
            "cordons": 2,
            "replicas": 3,
            "placements": 3,
            "demand": 2,
            "election": 3,
            "config": 2,
        }
        if not parts or shapes.get(parts[0]) != len(parts) or not all(parts):
            raise ValueError(f"key {text!r} has no known shape")
        return parts
