"""Planning a run before it starts: recommended settings for a model size and method."""

from tunelab.plan.recommend import (
    Recommendation,
    apply_recommendations,
    count_params,
    recommend,
    recommend_cmd,
)

__all__ = ["Recommendation", "apply_recommendations", "count_params", "recommend", "recommend_cmd"]
