"""face-emotions core library: everything the services share, with no web framework and no
task queue in it (``make lint`` checks that, and the order of the layers below).

Layers, each importing only those below it: ``cli`` > ``serving`` > ``jobs``, ``modeling`` >
``registry``, ``ops``, ``training_config`` > ``settings`` > ``data`` > ``labels``. The map of
the folders and the path of a job and of a model version through them is in
``docs/architecture.md``.

The package root stays import-light on purpose: training jobs, the batch worker and the
API all import it, and none of them should pay for (or depend on) the others' stacks.
"""

__version__ = "0.1.0"
