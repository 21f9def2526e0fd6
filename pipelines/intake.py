"""`trojan-gate intake MODEL.onnx --name NAME`: register a third-party ONNX model, status pending."""
from __future__ import annotations

import json

HELP = "register a third-party ONNX classifier as a new MLflow model version (status pending)"


def add_arguments(p):
    p.add_argument("model", help="path to a single-file .onnx classifier")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--source", help="where the model came from (URL, vendor); default: the file path")
    p.add_argument("--description", help="model version description")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")


def run(args) -> int:
    from trojan_gate.plugins.registry import configure_tracking, intake_onnx, version_tags

    configure_tracking(args.tracking_uri)
    ref = intake_onnx(args.model, args.name, source=args.source, description=args.description)
    print(json.dumps({"model_uri": ref.uri, "name": ref.name, "version": ref.version, "tags": version_tags(ref)},
                     indent=2))
    return 0
