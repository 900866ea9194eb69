"""Routing policy (pure: no I/O, no grpc, etcd or telemetry): which replica serves a request,
as filters → weighted scorers → a pick, each decision recorded; circuit breakers; exclusions."""
