"""jobqueue-exporter: Prometheus metrics for PostgreSQL-backed job queues.

Data flow, one module per stage: config -> presets -> poll -> snapshot -> metrics -> http (cli wires them).
"""

__version__ = "0.1.0"
