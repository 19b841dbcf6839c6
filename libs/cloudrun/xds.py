"""The front end's configuration as Envoy's resources (plain dicts, written as JSON): the bootstrap with its one
TLS listener, a cluster and a load assignment per revision, and one route table for every host.

What each piece stands in for on Cloud Run:
- the listener: Google's front end, TLS on 443 with a certificate for every `*.run.app` name; HTTP/2 (ALPN h2)
  to callers, the port of the host name ignored (`name` and `name:443` are the same service);
- a cluster per revision: its instances, reached in cleartext HTTP/2 (h2c on `$PORT`, as `--use-http2`),
  each request (not each connection) sent to the next instance in turn, with no cap of Envoy's own below
  what the instances take (the circuit breakers are out of the way; a cap is the autoscaler's to enforce);
- a route per host: a service's host splits its requests by the `traffic:` block's percents over its revisions,
  a tag's host reaches its revision only, and an unknown host gets 404 (gRPC clients see UNIMPLEMENTED); the
  request timeout (`timeoutSeconds`) bounds a stream's whole life, not only its wait for a first byte;
- retries only of what no instance has seen (refused connection or stream): Cloud Run's front end hides an
  instance going away from callers in the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
ROUTE_TABLE = "cloudrun"
LISTENER = "cloudrun"
# Far above anything one machine serves: Envoy's default (1,024 requests, 3 retries in flight) would otherwise
# be a cap of its own that Cloud Run does not have.
UNLIMITED = 1_000_000_000
# Retry only what never reached an instance's handler: safe for every method, idempotent or not.
RETRY_ON = "connect-failure,refused-stream,reset-before-request"
RETRIES = 3

Resource = dict[str, Any]
_TYPES = "type.googleapis.com/envoy."
CLUSTER_TYPE = _TYPES + "config.cluster.v3.Cluster"
ENDPOINTS_TYPE = _TYPES + "config.endpoint.v3.ClusterLoadAssignment"
ROUTES_TYPE = _TYPES + "config.route.v3.RouteConfiguration"


def source(path: Path) -> Resource:
    """A file Envoy reads its resources from, and reads again when a new one is renamed into its folder."""
    return {
        "resource_api_version": "V3",
        "path_config_source": {"path": str(path), "watched_directory": {"path": str(path.parent)}},
    }


def discovery(version: str, resources: Sequence[Resource]) -> Resource:
    """What one file holds: a DiscoveryResponse."""
    return {"version_info": version, "resources": list(resources)}


def bootstrap(cert: Path, key: Path, port: int, clusters: Path, routes: Path) -> Resource:
    """Admin on a free loopback port (its address written where `--admin-address-path` says); one TLS
    listener on loopback:`port`; clusters from the file `clusters`, the route table from `routes`."""
    tls = {
        "@type": _TYPES + "extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "common_tls_context": {
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_certificates": [
                {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}
            ],
        },
    }
    manager = {
        "@type": _TYPES + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": LISTENER,
        "codec_type": "AUTO",
        "strip_any_host_port": True,
        # A stream is bounded by its route's timeout alone (a quiet RouteChat is no reason to end it).
        "stream_idle_timeout": "0s",
        "rds": {"route_config_name": ROUTE_TABLE, "config_source": source(routes)},
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _TYPES + "extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    return {
        "node": {"id": "cloudrun-front-end", "cluster": "cloudrun"},
        "admin": {"address": _address(0)},
        "dynamic_resources": {"cds_config": source(clusters)},
        "static_resources": {
            "listeners": [
                {
                    "name": LISTENER,
                    "address": _address(port),
                    "filter_chains": [
                        {
                            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ],
                        }
                    ],
                }
            ]
        },
    }


def cluster(revision: str, endpoints: Path) -> Resource:
    """A revision's instances: h2c, round robin per request, endpoints from the file `endpoints`."""
    return {
        "@type": CLUSTER_TYPE,
        "name": revision,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": source(endpoints)},
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _TYPES + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": UNLIMITED,
                    "max_pending_requests": UNLIMITED,
                    "max_requests": UNLIMITED,
                    "max_retries": UNLIMITED,
                }
            ]
        },
    }


def endpoints(revision: str, ports: Sequence[int]) -> Resource:
    """The revision's ready instances, each on loopback:port."""
    lb_endpoints = [{"endpoint": {"address": _address(port)}} for port in ports]
    return {
        "@type": ENDPOINTS_TYPE,
        "cluster_name": revision,
        "endpoints": [{"lb_endpoints": lb_endpoints}] if lb_endpoints else [],
    }


def routes(hosts: Mapping[str, Mapping[str, int]], timeouts: Mapping[str, float]) -> Resource:
    """The route table: for each host, its revisions by weight (percent); the timeout of a host split over
    several revisions is the longest of theirs (Envoy has one timeout per route)."""
    virtual_hosts = []
    for host, weights in sorted(hosts.items()):
        live = {revision: weight for revision, weight in weights.items() if weight > 0}
        if not live:
            continue  # no traffic (a tag-less revision at 0%): the host is unknown, 404
        seconds = max(timeouts[revision] for revision in live)
        action: Resource = _timeouts(seconds)
        if len(live) == 1:
            action["cluster"] = next(iter(live))
        else:
            clusters = [{"name": revision, "weight": weight} for revision, weight in sorted(live.items())]
            action["weighted_clusters"] = {"clusters": clusters}
        action["retry_policy"] = {"retry_on": RETRY_ON, "num_retries": RETRIES}
        virtual_hosts.append(
            {"name": host, "domains": [host], "routes": [{"match": {"prefix": "/"}, "route": action}]}
        )
    return {"@type": ROUTES_TYPE, "name": ROUTE_TABLE, "virtual_hosts": virtual_hosts}


@dataclass(frozen=True)
class State:
    """What Envoy serves, in a form both the resources written and Envoy's config dump reduce to: each
    cluster's endpoint ports, and each host's weighted clusters and timeout."""

    endpoints: dict[str, tuple[int, ...]] = field(default_factory=dict)
    hosts: dict[str, tuple[tuple[tuple[str, int], ...], float]] = field(default_factory=dict)


def state(table: Resource, ports: Mapping[str, Sequence[int]]) -> State:
    return State({c: tuple(sorted(p)) for c, p in ports.items()}, _hosts(table))


def shown(dump: Resource) -> State:
    """The State of Envoy's `/config_dump?include_eds`; a warming cluster counts as not there yet."""
    endpoints: dict[str, tuple[int, ...]] = {}
    hosts: dict[str, tuple[tuple[tuple[str, int], ...], float]] = {}
    clusters: set[str] = set()
    for config in dump["configs"]:
        kind = config.get("@type", "").rpartition(".")[2]
        if kind == "ClustersConfigDump":
            active = {c["cluster"]["name"] for c in config.get("dynamic_active_clusters", [])}
            warming = {c["cluster"]["name"] for c in config.get("dynamic_warming_clusters", [])}
            clusters = active - warming
        elif kind == "EndpointsConfigDump":
            for assignment in config.get("dynamic_endpoint_configs", []):
                loads = assignment.get("endpoint_config", {})
                endpoints[loads.get("cluster_name", "")] = tuple(
                    sorted(
                        e["endpoint"]["address"]["socket_address"]["port_value"]
                        for locality in loads.get("endpoints", [])
                        for e in locality.get("lb_endpoints", [])
                    )
                )
        elif kind == "RoutesConfigDump":
            for table in config.get("dynamic_route_configs", []):
                hosts = _hosts(table.get("route_config", {}))
    # An endpoint assignment outlives its cluster in the dump for a while: only the active clusters count.
    return State({c: p for c, p in endpoints.items() if c in clusters}, hosts)


def _hosts(table: Resource) -> dict[str, tuple[tuple[tuple[str, int], ...], float]]:
    hosts = {}
    for host in table.get("virtual_hosts", []):
        action = host["routes"][0]["route"]
        if "cluster" in action:
            weights: tuple[tuple[str, int], ...] = ((action["cluster"], 100),)
        else:
            weights = tuple(
                sorted((c["name"], int(c["weight"])) for c in action["weighted_clusters"]["clusters"])
            )
        hosts[host["domains"][0]] = (weights, float(action["timeout"].removesuffix("s")))
    return hosts


def _timeouts(seconds: float) -> Resource:
    # `timeout` counts from the end of the request (a stream's half-close), `max_stream_duration` from its
    # start: together they bound a whole stream, as Cloud Run's request timeout does. A call that has not
    # answered yet ends with DEADLINE_EXCEEDED (with `timeout` alone: UNAVAILABLE); a stream that has answered
    # can only be reset (its caller sees INTERNAL).
    duration = f"{seconds:g}s"
    return {"timeout": duration, "max_stream_duration": {"max_stream_duration": duration}}


def _address(port: int) -> Resource:
    return {"socket_address": {"address": LOOPBACK, "port_value": port}}
