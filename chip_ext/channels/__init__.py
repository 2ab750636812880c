"""Channels: what CHIP knows that no CAM does. For every class, which channels of a layer matter,
learned from a dataset (`chip_ext.Importance`), checked for being causal by switching them off
(`ablation`), and compared with the rankings other methods give (`rankings`).

    from chip_ext import channels
    sources = channels.rankings(model, loader, "blocks.5", classes, importance=imp)   # {name: Tensor[C, K]}
    result = channels.ablation(model, images, labels, "blocks.5", sources["chip_effect"], classes, ks=(1, 4, 16))
    book = channels.atlas(model, loader, "blocks.5", top=16)   # per channel: its top images and positions
    parts = channels.conditional_maps(model, images, imp, "blocks.5", k=4)   # W[c, k] A_k per top channel
    per_class = channels.crp_relevance(model, loader, "blocks.5", classes)   # zennit-crp's ranking (optional)
"""
from .ablation import AblationResult, ablation, bootstrap_interval
from .atlas import Atlas, ReceptiveField, atlas, receptive_field
from .conditional import ConditionalMaps, conditional_maps
from .crp import crp_relevance
from .rankings import gradient_statistics, rankings, top_k

__all__ = ["AblationResult", "Atlas", "ConditionalMaps", "ReceptiveField", "ablation", "atlas", "bootstrap_interval",
           "conditional_maps", "crp_relevance", "gradient_statistics", "rankings", "receptive_field", "top_k"]
