"""Scoring tasks: a row of the matrices, the task metrics, the continual-learning metrics, reports."""
