"""COCO mAP of a saved model on a dataset; the same as the `deformable-detr-evaluate` command. See --help."""

from deformable_detr.apps.cli import evaluate_main as main

if __name__ == "__main__":
    main()
