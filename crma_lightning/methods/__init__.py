"""Continual-learning methods: adapter layouts (which LoRA serves a task, what trains) and
regularisers (EWC, LwF, O-LoRA), each one class, and the view of the training module they get."""
