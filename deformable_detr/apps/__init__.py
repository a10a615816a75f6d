"""What users run: the commands (cli.py), detection on files, evaluation of a saved model, the data report, and the
exports to ONNX and to transformers' format."""
