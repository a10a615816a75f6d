"""The twelve COCO summary metrics, as evaluation.py reports them (all higher-is-better), and their labels."""

SUMMARY_NAMES = [
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
]
SUMMARY_LABELS = [
    "mAP@[.5:.95]",
    "mAP@.50",
    "mAP@.75",
    "mAP small",
    "mAP medium",
    "mAP large",
    "mAR@1",
    "mAR@10",
    "mAR@100",
    "mAR small",
    "mAR medium",
    "mAR large",
]
