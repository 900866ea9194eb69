"""OpenTelemetry and Prometheus set-up shared by all services (DESIGN §6)."""
