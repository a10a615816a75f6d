"""Detect objects in images; the same as the `deformable-detr-detect` command. See --help."""

from deformable_detr.detect import main

if __name__ == "__main__":
    main()
