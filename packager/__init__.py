"""``edgepack``: a trained model and its data in, a signed, verified bundle out.

The steps, in the order a build runs them:

==================  ==============================================================
``data``            read the training and held-out data (CSV, Parquet, arrays), bounded
``convert``         scikit-learn (pipelines, trees, linear models, MLPs) to ONNX
``wide``            float64 converters for the preprocessing skl2onnx runs in float32
``boosters``        XGBoost and LightGBM through onnxmltools' converters
``trees``           views of fitted tree ensembles: each split as its library compares it
``precision``       keep tree thresholds exact: float64 where float32 would move a split
``quantize``        dynamic, static or fp16 quantisation of the graphs that have MatMul/Conv
``graph``           the ONNX graph helpers and checks quantisation relies on
``fidelity``        the gate: the converted model must answer as the original did
``reference``       the training profile (the same code the device profiles with)
``evaluate``        the card's numbers: metrics with intervals, slices, fairness, importances
``calibrate``       the calibration map a classifier's bundle carries, fitted on held-out rows
``champion``        champion vs challenger: metrics of both, the paired test, the rules
``card``            ``card.toml`` in, the card rendered out (Markdown, HTML, JSON)
``build``           the whole build, one function per step, the manifest with lineage, signing
``build_card``      the build's measuring steps: headline metrics, calibration, the card
``build_champion``  the build's champion step: verify the champion, run both, compare
``retrain``         the retraining loop, one run: fresh data to a promoted bundle, or why not
``watch``           ``edgepack retrain --watch``: runs of the loop on its recipe's triggers
``hook``            ``--watch --listen``: the fleet's signed alert webhook, checked, queued
``tomlfile``        reading the small TOML files a user writes (the card, a recipe), bounded
``sample_data``     small synthetic data sets the tests and the demo train on
``cli``             the ``edgepack`` command
``inspection``      what ``edgepack inspect`` prints of a bundle (pure formatting)
``errors``          the packager's error tree
==================  ==============================================================

This package runs on a workstation or a build server; it is never installed on a device
and the agent never imports it. What it shares with the agent and the fleet (the bundle,
manifest, profile and signing formats) is in :mod:`edgefleet.contract`.
"""

__all__ = ["boosters", "build", "build_card", "build_champion", "calibrate", "card", "champion",
           "cli", "convert", "data", "errors", "evaluate", "fidelity", "graph", "hook",
           "inspection", "precision", "quantize", "reference", "retrain", "sample_data", "tomlfile",
           "trees", "watch", "wide"]
