"""The frozen causal LM: loading (Hub, local folder, GGUF, NF4), the output head, sharding."""

from crma_lightning.backbone.loading import BackboneConfig, load_backbone

__all__ = ["BackboneConfig", "load_backbone"]
