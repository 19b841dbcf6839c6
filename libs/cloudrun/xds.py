"""The front end's configuration as Envoy's resources (plain dicts, written as JSON): the bootstrap with its one
TLS listener, a cluster and a load assignment per revision, and one route table for every host.

What each piece stands in for on Cloud Run:
- the listener: Google's front end, TLS on 443 with a certificate for every `*.run.app` name; HTTP/2 (ALPN h2)
  to callers, the port of the host name ignored (`name` and `name:443` are the same service);
- a cluster per revision: its instances, reached in cleartext HTTP/2 (h2c on `$PORT`, as `--use-http2`), each
  request (not each connection) sent to the instance with the fewest in flight. `containerConcurrency` is
  each instance's cap: one connection per instance (a per-host circuit breaker; Envoy runs one worker, so one
  pool per instance) carrying at most `concurrency` streams, a stream holding its slot for its whole life. A
  call that finds every slot busy waits in Envoy's queue (as Cloud Run queues while an instance starts) unless
  the revision refuses (the autoscaler's call at maxScale, a runtime override): then the pool's overflow is
  answered 429 (gRPC clients see UNAVAILABLE), as Cloud Run answers. An instance being scaled in is DRAINING:
  no new call, its open streams continue;
- a route per host: a service's host splits its requests by the `traffic:` block's percents over its revisions,
  a tag's host reaches its revision only, and an unknown host gets 404 (gRPC clients see UNIMPLEMENTED); the
  request timeout (`timeoutSeconds`) bounds a stream's whole life, not only its wait for a first byte;
- retries only of what no instance has seen (refused connection or stream): Cloud Run's front end hides an
  instance going away from callers in the same way.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
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
# What Envoy's pool answers when it may not queue a call (response flag UO, upstream overflow), and what Cloud
# Run answers a revision at maxScale with every slot busy.
OVERFLOW_FLAG = "UO"
TOO_MANY_REQUESTS = 429

HEALTHY, DRAINING = "HEALTHY", "DRAINING"

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
        # The caller's deadline kept aside before the route is chosen (see CALLER_TIMEOUT).
        "early_header_mutation_extensions": [
            {
                "name": "envoy.http.early_header_mutation.header_mutation",
                "typed_config": {
                    "@type": _TYPES
                    + "extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                    "mutations": [_set(CALLER_TIMEOUT, "%REQ(grpc-timeout)%")],
                },
            }
        ],
        "rds": {"route_config_name": ROUTE_TABLE, "config_source": source(routes)},
        "local_reply_config": {
            "mappers": [
                {
                    "filter": {"response_flag_filter": {"flags": [OVERFLOW_FLAG]}},
                    "status_code": TOO_MANY_REQUESTS,
                }
            ]
        },
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
        # The admin layer takes `/runtime_modify`: a revision refuses or queues with no new cluster (a new
        # cluster would start new connections, and its breakers would not count the old one's calls).
        "layered_runtime": {"layers": [{"name": "admin", "admin_layer": {}}]},
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


def cluster(revision: str, endpoints: Path, concurrency: int) -> Resource:
    """A revision's instances: h2c, each at most `concurrency` calls at once, the least busy one picked per
    request, endpoints from the file `endpoints`."""
    least_request = _TYPES + "extensions.load_balancing_policies.least_request.v3.LeastRequest"
    return {
        "@type": CLUSTER_TYPE,
        "name": revision,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": source(endpoints)},
        "connect_timeout": "1s",
        # Every instance compared (not two at random), so an instance with a free slot is found if one is.
        "load_balancing_policy": {
            "policies": [
                {
                    "typed_extension_config": {
                        "name": "envoy.load_balancing_policies.least_request",
                        "typed_config": {"@type": least_request, "selection_method": "FULL_SCAN"},
                    }
                }
            ]
        },
        # Never "panic" onto DRAINING instances when few are left: a drained instance gets no new call.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _TYPES + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": concurrency}},
                # Past the router (which read it back into grpc-timeout): the caller's copy goes no further.
                "http_filters": [
                    {
                        "name": "envoy.filters.http.header_mutation",
                        "typed_config": {
                            "@type": _TYPES + "extensions.filters.http.header_mutation.v3.HeaderMutation",
                            "mutations": {"request_mutations": [{"remove": CALLER_TIMEOUT}]},
                        },
                    },
                    {
                        "name": "envoy.filters.http.upstream_codec",
                        "typed_config": {
                            "@type": _TYPES + "extensions.filters.http.upstream_codec.v3.UpstreamCodec"
                        },
                    },
                ],
            }
        },
        "circuit_breakers": {
            # The revision as a whole: no cap of Envoy's own (the queue is bounded by the runtime override).
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": UNLIMITED,
                    "max_pending_requests": UNLIMITED,
                    "max_requests": UNLIMITED,
                    "max_retries": UNLIMITED,
                }
            ],
            # One connection per instance: with the streams per connection, the instance's cap.
            "per_host_thresholds": [{"priority": "DEFAULT", "max_connections": 1}],
        },
    }


def queue_key(revision: str) -> str:
    """The runtime key that overrides the revision's queue bound (0: a call that finds no free slot is
    refused)."""
    return f"circuit_breakers.{revision}.default.max_pending_requests"


def endpoints(revision: str, ports: Sequence[int], draining: Collection[int] = ()) -> Resource:
    """The revision's instances, each on loopback:port; those in `draining` get no new call (their open calls
    and streams go on)."""
    lb_endpoints = [
        {"endpoint": {"address": _address(port)}, "health_status": DRAINING if port in draining else HEALTHY}
        for port in ports
    ]
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
        route = {
            "match": {"prefix": "/"},
            "route": action,
            "request_headers_to_add": [_set("grpc-timeout", f"%REQ({CALLER_TIMEOUT})%")["append"]],
        }
        virtual_hosts.append({"name": host, "domains": [host], "routes": [route]})
    return {"@type": ROUTES_TYPE, "name": ROUTE_TABLE, "virtual_hosts": virtual_hosts}


@dataclass(frozen=True)
class State:
    """What Envoy serves, in a form both the resources written and Envoy's config dump reduce to: each
    cluster's endpoints (port, draining), and each host's weighted clusters and timeout."""

    endpoints: dict[str, tuple[tuple[int, bool], ...]] = field(default_factory=dict)
    hosts: dict[str, tuple[tuple[tuple[str, int], ...], float]] = field(default_factory=dict)


def state(
    table: Resource, ports: Mapping[str, Sequence[int]], draining: Mapping[str, Collection[int]]
) -> State:
    return State(
        {c: tuple(sorted((p, p in draining.get(c, ())) for p in ps)) for c, ps in ports.items()},
        _hosts(table),
    )


def shown(dump: Resource) -> State:
    """The State of Envoy's `/config_dump?include_eds`; a warming cluster counts as not there yet."""
    endpoints: dict[str, tuple[tuple[int, bool], ...]] = {}
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
                        (
                            e["endpoint"]["address"]["socket_address"]["port_value"],
                            # Envoy's dump shows a DRAINING endpoint as UNHEALTHY (only HEALTHY is written).
                            e.get("health_status", HEALTHY) != HEALTHY,
                        )
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


# Envoy rewrites a gRPC call's `grpc-timeout` to the route's own timeout (the revision's timeoutSeconds) when it
# picks the route, so the instance would see 3600 s left whatever its caller set. The caller's value is kept
# aside before that (an early header mutation) and put back on the way to the instance (absent: Envoy's stays):
# the instance sees the time its caller has left, as behind Cloud Run's front end, and passes it on to its own
# calls. Envoy itself still bounds the call by the revision's timeout only: enforcing the caller's deadline too
# would race the caller's own timer (an answered stream reset at that instant ends INTERNAL, not
# DEADLINE_EXCEEDED).
CALLER_TIMEOUT = "x-cloudrun-caller-grpc-timeout"


def _set(header: str, value: str) -> Resource:
    """A header mutation that sets `header` to `value` (none when the value is empty)."""
    return {
        "append": {"header": {"key": header, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
    }


def _address(port: int) -> Resource:
    return {"socket_address": {"address": LOOPBACK, "port_value": port}}
