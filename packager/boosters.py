"""XGBoost and LightGBM: onnxmltools' converters registered with skl2onnx.

Both libraries are optional extras (``edgefleet[xgboost]``, ``edgefleet[lightgbm]``,
each with onnxmltools). Registering their converters with skl2onnx lets a model be
converted alone or as the last step of a scikit-learn Pipeline (a ColumnTransformer in
front), through the same path as every scikit-learn estimator.

How each compares a feature with a split threshold, which decides what "exact" means:

* XGBoost converts every input to float32 and compares ``x32 < t32`` with float32
  thresholds. The ONNX graph does the same on float32 input: preprocessing in front of
  it runs in float64 and is cast to float32 just before the trees, as XGBoost does
  with the array scikit-learn hands it.
* LightGBM predicts on float64 input as float64 and compares ``x <= t`` with float64
  thresholds; onnxmltools rounds them to float32, which :mod:`packager.precision`
  rewrites back to the booster's own float64 values.

This module does not convert anything itself.
"""

from __future__ import annotations

import copy
import re
from typing import Any

__all__ = ["BOOSTERS", "library_of", "missing_library_hint", "register"]

# the estimator classes this module registers, by library
BOOSTERS = {
    "xgboost": ("XGBClassifier", "XGBRegressor"),
    "lightgbm": ("LGBMClassifier", "LGBMRegressor"),
}

_registered: set[str] = set()


def _options() -> dict[str, Any]:
    return {"nocl": [True, False], "zipmap": [True, False, "columns"]}


def register(library: str) -> bool:
    """Register ``library``'s converters with skl2onnx once; False when not installed."""
    if library in _registered:
        return True
    try:
        from skl2onnx import update_registered_converter
        from skl2onnx.common.shape_calculator import (
            calculate_linear_classifier_output_shapes,
            calculate_linear_regressor_output_shapes,
        )

        if library == "xgboost":
            from onnxmltools.convert.xgboost.operator_converters.XGBoost import (
                convert_xgboost as convert,
            )
            from xgboost import XGBClassifier as Classifier
            from xgboost import XGBRegressor as Regressor
            alias = "XGBoostXGB"
        elif library == "lightgbm":
            from lightgbm import LGBMClassifier as Classifier
            from lightgbm import LGBMRegressor as Regressor
            from onnxmltools.convert.lightgbm.operator_converters.LightGbm import (
                convert_lightgbm as convert,
            )
            alias = "LightGbmLGBM"
        else:
            raise ValueError(f"unknown booster library {library!r}")
    except ImportError:
        return False
    if library == "xgboost":
        convert = _positional(convert)
    update_registered_converter(Classifier, f"{alias}Classifier",
                                calculate_linear_classifier_output_shapes, convert,
                                options=_options())
    update_registered_converter(Regressor, f"{alias}Regressor",
                                calculate_linear_regressor_output_shapes, convert,
                                options={"split": None} if library == "lightgbm" else None)
    _registered.add(library)
    return True


def _positional(convert: Any) -> Any:
    """onnxmltools reads XGBoost's splits by feature *name* and understands only ``f0``,
    ``f1``, ...; a model fitted on a DataFrame names them after its columns. Convert a
    copy whose booster has the names dropped: the indices, in column order, remain."""

    def run(scope: Any, operator: Any, container: Any) -> None:
        est = operator.raw_operator
        booster = est.get_booster()
        names = booster.feature_names or []
        if all(re.fullmatch(r"f\d+", n) for n in names):
            convert(scope, operator, container)
            return
        twin = copy.copy(est)
        twin._Booster = booster.copy()
        twin._Booster.feature_names = None
        twin._Booster.feature_types = None
        operator.raw_operator = twin
        try:
            convert(scope, operator, container)
        finally:
            operator.raw_operator = est

    return run


def library_of(est: Any) -> str | None:
    """``xgboost`` / ``lightgbm`` when ``est`` comes from one of them, else None."""
    module = type(est).__module__.split(".", 1)[0]
    return module if module in BOOSTERS else None


def missing_library_hint(module: str) -> str | None:
    """The one line to print when unpickling needs ``module`` and it is not installed."""
    top = module.split(".", 1)[0]
    if top in ("xgboost", "lightgbm"):
        return f"the model needs {top}: pip install 'edgefleet[{top}]'"
    if top == "onnxmltools":
        return "converting XGBoost / LightGBM needs onnxmltools: " \
               "pip install 'edgefleet[xgboost]' or 'edgefleet[lightgbm]'"
    return None
