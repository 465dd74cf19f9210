"""Active-learning strategies of the app."""

from .most_anomalous import MostAnomalousFirst  # noqa: F401
