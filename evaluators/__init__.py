"""Evaluators: load a model and text, apply a genome (a view or a compact model), measure fitness.

`evaluators.config` holds the settings and imports nothing heavy; `evaluators.fitness` the
interface the search talks to (`Evaluator`, `ModelEvaluator`, `Fitness`).
"""
