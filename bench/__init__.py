"""Benchmarks of face-emotions that report ratios, never absolute times.

The machines this runs on (2 shared cores in CI, a GPU box now and then) are noisy: the same loop
ran 8 to 43 images/s minutes apart. An absolute time says more about the neighbours than about
the code, so every figure here is the ratio of two things measured side by side in one run
(interleaved repetitions, medians). Entry point: ``python -m bench.run``.
"""
