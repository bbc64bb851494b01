"""Developer and demo tooling (not imported by the services)."""
