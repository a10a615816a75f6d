"""Train or fine-tune Deformable DETR; the same as the `deformable-detr-train` command. See --help."""

from deformable_detr.apps.cli import train_main as main

if __name__ == "__main__":
    main()
