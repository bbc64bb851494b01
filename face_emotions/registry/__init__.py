"""The MLflow model registry: publishing and fetching versions, and the one promotion path."""
