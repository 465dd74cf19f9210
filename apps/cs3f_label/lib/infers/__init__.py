"""Infer tasks of the app."""

from .anomaly import CS3FAnomaly, CS3FBatchInfer  # noqa: F401
