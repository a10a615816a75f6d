"""Export a saved model to ONNX and check it in onnxruntime; the same as the `deformable-detr-export` command. See
--help."""

from deformable_detr.cli import export_main as main

if __name__ == "__main__":
    main()
