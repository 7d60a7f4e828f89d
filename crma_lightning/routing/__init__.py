"""Choosing a task without its id: per-task feature statistics, and the routers fitted on them."""

from crma_lightning.routing.routers import FeatureSums, LinearRouter, fit_lda

__all__ = ["FeatureSums", "LinearRouter", "fit_lda"]
