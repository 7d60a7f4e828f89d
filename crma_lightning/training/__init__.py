"""The LightningModule and its training step: gradients, optimiser, schedules, the task clock."""
