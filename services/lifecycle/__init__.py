"""How a meshserve service process lives: service (one lifecycle for router, scheduler and node
agent: signals, tracing, metrics, etcd session, gRPC server, stop order), runtime (event loop,
logging, the ready file), watchdog (logs where a blocked event loop is)."""
