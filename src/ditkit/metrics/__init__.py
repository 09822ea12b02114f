"""Measurements of models: parameter counts and FLOPs."""

from .flops import count_flops, count_parameters, model_cost

__all__ = ["count_flops", "count_parameters", "model_cost"]
