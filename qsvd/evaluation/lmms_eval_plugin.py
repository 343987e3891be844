"""qsvd's entry in lmms-eval's model registry (entry-point group `lmms_eval.models`, named in pyproject): `--model qsvd`.

Kept apart from `lmms_eval_adapter`, and importing nothing at module level: lmms-eval loads this entry point while
`lmms_eval.models` initialises, which the adapter's own `import lmms_eval.api.model` may be what triggers; the
adapter module is imported only when `--model qsvd` is resolved.
"""

from __future__ import annotations

MODEL_ID = "qsvd"
MODEL_CLASS = "qsvd.evaluation.lmms_eval_adapter.QSVDModel"


def manifest():
    """The `lmms_eval.models` entry point's payload: `--model qsvd` is the simple model `MODEL_CLASS`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(MODEL_ID, simple_class_path=MODEL_CLASS)
