"""What a model predicts and how good it is: detections in COCO's results format, COCO mAP, evaluation pictures."""
