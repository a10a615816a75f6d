"""Writes a detection dataset (our schema) to disk in the layouts that `load_detection_dataset` reads."""

import json
import os
import re


def _rows(dataset):
    for index, example in enumerate(dataset):
        yield index, example, list(zip(example["objects"]["bbox"], example["objects"]["category"]))


def write_coco(
    splits: dict, class_names: list[str], root: str, layout: str = "roboflow", first_category_id: int = 1
) -> str:
    """splits: {split name: dataset}. layout "roboflow": {split}/_annotations.coco.json beside the images, with
    Roboflow's extra supercategory category; "instances": annotations/instances_{split}.json + {split}/."""
    categories = [
        {"id": first_category_id + i, "name": n, "supercategory": "shapes"} for i, n in enumerate(class_names)
    ]
    if layout == "roboflow":
        categories.insert(0, {"id": first_category_id - 1, "name": "shapes", "supercategory": "none"})
    for split, dataset in splits.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, annotations = [], []
        for index, example, objects in _rows(dataset):
            name = f"{split}_{index:03d}.jpg"
            example["image"].save(os.path.join(root, split, name), quality=95)
            images.append(
                {"id": 100 + index, "file_name": name, "width": example["width"], "height": example["height"]}
            )
            for box, category in objects:
                annotations.append(
                    {
                        "id": len(annotations),
                        "image_id": 100 + index,
                        "category_id": first_category_id + category,
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": 0,
                    }
                )
        coco = {"images": images, "annotations": annotations, "categories": categories}
        if layout == "roboflow":
            path = os.path.join(root, split, "_annotations.coco.json")
        else:
            os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
            path = os.path.join(root, "annotations", f"instances_{split}.json")
        with open(path, "w") as f:
            json.dump(coco, f)
    return root


def write_voc(splits: dict, class_names: list[str], root: str) -> str:
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    for split, dataset in splits.items():
        stems = []
        for index, example, objects in _rows(dataset):
            stem = f"{split}_{index:03d}"
            stems.append(stem)
            example["image"].save(os.path.join(root, "JPEGImages", f"{stem}.jpg"), quality=95)
            xml_objects = "".join(
                f"<object><name>{class_names[c]}</name><difficult>0</difficult><bndbox><xmin>{x:g}</xmin><ymin>{y:g}</ymin>"
                f"<xmax>{x + w:g}</xmax><ymax>{y + h:g}</ymax></bndbox></object>"
                for (x, y, w, h), c in objects
            )
            with open(os.path.join(root, "Annotations", f"{stem}.xml"), "w") as f:
                f.write(
                    f"<annotation><filename>{stem}.jpg</filename><size><width>{example['width']}</width>"
                    f"<height>{example['height']}</height><depth>3</depth></size>{xml_objects}</annotation>"
                )
        with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("\n".join(stems) + "\n")
    return root


def write_imagefolder(dataset, class_names: list[str], root: str) -> str:
    """An imagefolder with metadata.jsonl, as `datasets.load_dataset(folder)` reads it (category as ints)."""
    os.makedirs(os.path.join(root, "train"), exist_ok=True)
    with open(os.path.join(root, "train", "metadata.jsonl"), "w") as f:
        for index, example, objects in _rows(dataset):
            name = f"{index:03d}.png"
            example["image"].save(os.path.join(root, "train", name))
            f.write(
                json.dumps(
                    {
                        "file_name": name,
                        "objects": {
                            "bbox": [b for b, _ in objects],
                            "category": [c for _, c in objects],
                            "area": [b[2] * b[3] for b, _ in objects],
                        },
                    }
                )
                + "\n"
            )
    return root


def edited_coco(dataset, root, change) -> tuple[str, str]:
    """A COCO folder (standard layout) of `dataset` as its train split, whose loaded file `change(coco)` edits;
    (folder, file). inf and nan are written as JSON's usual Infinity and NaN."""
    from deformable_detr.data.shapes import CLASS_NAMES

    folder = write_coco({"train": dataset}, CLASS_NAMES, str(root), "instances")
    path = os.path.join(folder, "annotations", "instances_train.json")
    with open(path) as f:
        coco = json.load(f)
    change(coco)
    with open(path, "w") as f:
        json.dump(coco, f)
    return folder, path


def edited_voc(dataset, root, pattern: str, replacement: str) -> tuple[str, str]:
    """A VOC folder of `dataset` as its train split, whose train_000.xml has the first match of `pattern` replaced;
    (folder, file)."""
    from deformable_detr.data.shapes import CLASS_NAMES

    folder = write_voc({"train": dataset}, CLASS_NAMES, str(root))
    path = os.path.join(folder, "Annotations", "train_000.xml")
    with open(path) as f:
        xml = re.sub(pattern, replacement, f.read(), count=1)
    with open(path, "w") as f:
        f.write(xml)
    return folder, path


def write_yolo(
    splits: dict, class_names: list[str], root: str, layout: str = "roboflow", names_as: str = "list"
) -> str:
    """splits: {split name: dataset}, written as YOLO labels (`class cx cy w h`, normalised) with a data.yaml.
    layout "roboflow": {split}/images + {split}/labels, the yaml's paths "../{split}/images" as Roboflow writes
    them; "ultralytics": images/{split} + labels/{split}, with `path: .`. names_as "list" or "dict" ({0: name})."""
    lines = ["path: ." if layout == "ultralytics" else "", f"nc: {len(class_names)}"]
    names = {i: name for i, name in enumerate(class_names)}
    lines.append(
        "names: [" + ", ".join(map(json.dumps, class_names)) + "]"
        if names_as == "list"
        else "names:\n" + "\n".join(f"  {i}: {json.dumps(name)}" for i, name in names.items())
    )
    for split, dataset in splits.items():
        images, labels = (
            (f"{split}/images", f"{split}/labels") if layout == "roboflow" else (f"images/{split}", f"labels/{split}")
        )
        key = {"valid": "val", "validation": "val"}.get(split, split)
        lines.append(f"{key}: {'../' + images if layout == 'roboflow' else images}")
        for folder in (images, labels):
            os.makedirs(os.path.join(root, folder), exist_ok=True)
        for index, example, objects in _rows(dataset):
            stem = f"{split}_{index:03d}"
            example["image"].save(os.path.join(root, images, f"{stem}.jpg"), quality=95)
            width, height = example["image"].size
            with open(os.path.join(root, labels, f"{stem}.txt"), "w") as f:
                for (x, y, w, h), c in objects:
                    f.write(
                        f"{c} {(x + w / 2) / width:.6f} {(y + h / 2) / height:.6f} {w / width:.6f} {h / height:.6f}\n"
                    )
    with open(os.path.join(root, "data.yaml"), "w") as f:
        f.write("\n".join(line for line in lines if line) + "\n")
    return root
