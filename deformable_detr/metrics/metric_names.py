"""The twelve COCO summary metrics, as evaluation.py reports them (all higher-is-better): their names, labels and
the COCO area range (evaluation.AREA_RANGES) of the objects each one scores."""

SUMMARY = [  # (name, label, area range), in COCOeval's stats order
    ("map", "mAP@[.5:.95]", "all"),
    ("map_50", "mAP@.50", "all"),
    ("map_75", "mAP@.75", "all"),
    ("map_small", "mAP small", "small"),
    ("map_medium", "mAP medium", "medium"),
    ("map_large", "mAP large", "large"),
    ("mar_1", "mAR@1", "all"),
    ("mar_10", "mAR@10", "all"),
    ("mar_100", "mAR@100", "all"),
    ("mar_small", "mAR small", "small"),
    ("mar_medium", "mAR medium", "medium"),
    ("mar_large", "mAR large", "large"),
]
SUMMARY_NAMES = [name for name, _, _ in SUMMARY]
SUMMARY_LABELS = [label for _, label, _ in SUMMARY]
SUMMARY_AREAS = {name: area for name, _, area in SUMMARY}
