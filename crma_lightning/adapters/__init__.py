"""The adapters as maths: the doubly-stochastic projection, the CRMA block, its injection into the
decoder layers, the per-task LoRAs, and their configs. No Lightning."""
