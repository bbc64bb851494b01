"""Training service: Lightning data/model modules, Hydra configs and the train/evaluate/promote
entry points. Depends on the core library only; publishes models through the MLflow registry.
"""
