"""Evaluators: load a model and text, apply a chromosome (view or compact model), measure fitness."""
from evaluators.fitness import EvaluatorConfig, Evaluator, Fitness, ModelEvaluator

__all__ = ["Evaluator", "EvaluatorConfig", "Fitness", "ModelEvaluator"]
