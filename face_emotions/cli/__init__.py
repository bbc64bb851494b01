"""The ``face-emotions`` console script: one module per command group (see ``main``)."""
