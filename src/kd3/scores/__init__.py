"""Data-free relevance scores: how much a pool image looks like the teacher's training data, from the
teacher alone (one inference pass with hooks), with no labels and no provenance.

Convention: higher = more relevant. Names and formulas are in ``registry``; ``cache`` keeps a pool's
teacher pass on disk, keyed by the pool's digest and the teacher's sha256.
"""
from kd3.scores.cache import cached_teacher_outputs
from kd3.scores.outputs import TeacherOutputs, teacher_outputs
from kd3.scores.ranks import mean_rank, min_rank, percentile_ranks
from kd3.scores.registry import BASE_SCORES, DEFAULT_SCORE, FITTED_SCORES, available_scores, compute_score, resolve

__all__ = ["BASE_SCORES", "DEFAULT_SCORE", "FITTED_SCORES", "TeacherOutputs", "available_scores", "cached_teacher_outputs",
           "compute_score", "mean_rank", "min_rank", "percentile_ranks", "resolve", "teacher_outputs"]
