"""Measurements of models: parameter counts and FLOPs."""

from .flops import config_cost, count_flops, count_parameters, model_cost

__all__ = ["config_cost", "count_flops", "count_parameters", "model_cost"]
