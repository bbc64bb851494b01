"""Running the services: log format, secret redaction, Prometheus metrics, malloc tuning."""
