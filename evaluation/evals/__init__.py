"""Evaluation datasets, rubrics, single and batch evaluations (issue 17)."""
