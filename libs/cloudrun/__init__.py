"""The local Cloud Run: what stands in, on one machine, for the platform the services are deployed on.

- `frontend`: Google's front end (Envoy): TLS on one port for every `*.run.app` name, routing by host,
  per-request balancing over a revision's instances, traffic splits and tags, the request timeout.
- `xds`: the front end's configuration, as Envoy's resources.
- `autoscaler`: a revision's instances, added and removed by the calls in flight (containerConcurrency, min/max).
- `names`: the hosts a service and its tags answer on.
"""
