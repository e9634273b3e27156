"""What both sides need: data, splits, the text encoder with its adapters, the recommender,
local training, metrics and adapter (de)serialisation."""

from shared_model.allocator import reuse_large_allocations

reuse_large_allocations()
