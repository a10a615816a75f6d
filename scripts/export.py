"""Export a saved model to ONNX (checked in onnxruntime) or to transformers' own format (checked in transformers);
the same as the `deformable-detr-export` command. See --help."""

from deformable_detr.apps.cli import export_main as main

if __name__ == "__main__":
    main()
