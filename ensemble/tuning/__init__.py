"""Learning the ensemble's combination on held-out predictions.

`objective` and `weights` are pure (numpy/scipy/scikit-learn) and import neither Ray nor torch;
the Ray Tune glue lives in `ensemble.tuning.search` and is not imported here, so importing this
package stays cheap and Ray-free.
"""

from ensemble.tuning.objective import METRICS, metric_value, score
from ensemble.tuning.weights import FitResult, choose, fit_caruana, fit_stacking, fit_weighted

__all__ = [
    "METRICS",
    "FitResult",
    "choose",
    "fit_caruana",
    "fit_stacking",
    "fit_weighted",
    "metric_value",
    "score",
]
