"""Face-emotion classification: shared labels, safe image decoding and dataset scanning.

The package root stays import-light on purpose: training jobs, the batch worker and the
API all import it, and none of them should pay for (or depend on) the others' stacks.
"""

__version__ = "0.1.0"
