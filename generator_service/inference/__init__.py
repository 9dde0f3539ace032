"""Inference: the batching engine, the model-kind registry, synthesis."""
