"""Detection data in one schema: COCO, Pascal VOC, YOLO folders and Hub datasets (sources.py), their image checks,
the samples and batches trained on, DETR's augmentation, and synthetic data."""
