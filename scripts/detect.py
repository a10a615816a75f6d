"""Detect objects in images; the same as the `deformable-detr-detect` command. See --help."""

from deformable_detr.apps.cli import detect_main as main

if __name__ == "__main__":
    main()
