"""The packager's error tree. Each names the file, column or estimator at fault.

    PackagerError
    ├── DataError              training / calibration data unreadable or unusable
    ├── ModelLoadError         the model file cannot be loaded
    ├── UnsupportedModelError  no converter for this estimator (names it)
    ├── ConversionError        the converter or onnxruntime failed on the converted graph
    ├── QuantizationError      the asked quantisation could not be done
    ├── FidelityError          the converted model disagrees with the original past a bound
    ├── FairnessError          a fairness gap is past its bound (``--max-fairness-gap``)
    ├── CardError              the model card file is unreadable or has an unknown key
    ├── PromotionRuleError     a ``--promote-if`` rule is malformed or meaningless (names it)
    ├── SchemaChangeError      champion and challenger take different inputs or classes
    ├── ChampionLostError      the challenger does not win (``table``; exit status 6)
    ├── RecipeError            a retraining recipe is unreadable or refused (names the key)
    ├── FleetApiError          the fleet server refused a retraining run's call (``status``)
    └── BuildError             anything else the build refuses (bad name, version, output)

Contract errors (:mod:`edgefleet.contract.errors`) pass through unchanged: a bad key is a
``KeyFileError``, a bad bundle a ``BundleError``.
"""

from __future__ import annotations

from edgefleet.cli import GATE
from edgefleet.errors import EdgefleetError

__all__ = [
    "BuildError",
    "CardError",
    "ChampionLostError",
    "ConversionError",
    "DataError",
    "FairnessError",
    "FidelityError",
    "FleetApiError",
    "ModelLoadError",
    "PackagerError",
    "PromotionRuleError",
    "QuantizationError",
    "RecipeError",
    "SchemaChangeError",
    "UnsupportedModelError",
]


class PackagerError(EdgefleetError):
    """Base of the packager's refusals."""


class DataError(PackagerError):
    """Training, evaluation or calibration data cannot be used."""


class ModelLoadError(PackagerError):
    """The model file cannot be loaded."""


class UnsupportedModelError(PackagerError):
    """No converter for this estimator."""


class ConversionError(PackagerError):
    """Conversion to ONNX failed, or the converted graph does not run."""


class QuantizationError(PackagerError):
    """The asked quantisation failed."""


class FidelityError(PackagerError):
    """The converted model disagrees with the original beyond the bounds."""

    exit_code = GATE

    def __init__(self, message: str, table: str = "") -> None:
        super().__init__(message)
        self.table = table


class FairnessError(PackagerError):
    """A fairness gap of a sensitive column is past its bound; ``table`` shows every check."""

    exit_code = GATE

    def __init__(self, message: str, table: str = "") -> None:
        super().__init__(message)
        self.table = table


class CardError(PackagerError):
    """The model card file (``--card``) cannot be used; the message names the key at fault."""


class PromotionRuleError(PackagerError):
    """A ``--promote-if`` rule cannot be used; the message quotes the rule."""


class SchemaChangeError(PackagerError):
    """The challenger's inputs or classes differ from the champion's and the change was not
    declared (``--allow-schema-change``); the message names the feature or class."""


class ChampionLostError(PackagerError):
    """The challenger does not beat the champion; ``table`` shows the whole comparison.
    ``edgepack`` exits 6, refused by a check (:mod:`edgefleet.cli`), so a pipeline can tell
    "not better" from "broken"."""

    exit_code = GATE

    def __init__(self, message: str, table: str = "") -> None:
        super().__init__(message)
        self.table = table


class BuildError(PackagerError):
    """A build input (name, version, option, output path) is refused."""


class RecipeError(PackagerError):
    """A retraining recipe (``recipe.toml``) is unreadable or refused; ``field`` names the
    key at fault."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class FleetApiError(PackagerError):
    """The fleet server refused a call of a retraining run, or cannot be reached
    (``status`` 0); the exit status follows the HTTP status (:mod:`edgefleet.cli`)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status
