"""Detect objects in video files (`detect_video`, for `detect_files`): frames read and the boxes drawn into a new
MPEG-4 video with PyAV, the optional [video] extra."""

import json
import os

from ..metrics.predictions import detect, of_classes
from ..utils.drawing import draw_detections
from ..utils.file_writing import replaced_when_done

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")  # read with PyAV (the [video] extra), given as files


def is_video(path: str) -> bool:
    return path.lower().endswith(VIDEO_SUFFIXES)


class VideoError(ValueError):
    """A video PyAV cannot read (or whose boxes cannot be encoded)."""


def video_library(path: str):
    """PyAV (the `av` module); ValueError naming `path` and the [video] extra where it is not installed."""
    try:
        import av
    except ImportError:
        raise ValueError(
            f"{path} is a video: reading videos needs PyAV, the [video] extra: pip install "
            "'hub-deformable-detr[video]' (or pip install av)"
        ) from None
    return av


def detect_video(path: str, model, processor, settings: tuple, json_path: str, video_path: str) -> list[dict]:
    """A video's detections frame by frame (settings: threshold, top_k, batch_size, kept class ids): the JSON
    {"video", "width", "height", "fps", "frames": [{"frame", "detections"}]} and a new MPEG-4 video with the boxes
    drawn, both written whole or not at all; -> the frames' entries for `combined_results`. VideoError if PyAV
    cannot read or write it."""
    av = video_library(path)
    threshold, top_k, batch_size, keep = settings
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    frames, entries = [], []
    try:
        with replaced_when_done(video_path) as video_temporary, av.open(path) as source:
            stream = source.streams.video[0]
            fps = stream.average_rate or 25
            with av.open(video_temporary, "w", format="mp4") as target:
                encoder = target.add_stream("mpeg4", rate=fps)
                encoder.width, encoder.height = stream.codec_context.width, stream.codec_context.height
                encoder.pix_fmt = "yuv420p"
                batch = []
                for frame in source.decode(stream):
                    batch.append(frame.to_image().convert("RGB"))
                    if len(batch) == batch_size:
                        frames += _detect_frames(model, processor, batch, threshold, top_k, keep, encoder, target)
                        batch = []
                if batch:
                    frames += _detect_frames(model, processor, batch, threshold, top_k, keep, encoder, target)
                for packet in encoder.encode():
                    target.mux(packet)
            width, height = encoder.width, encoder.height
            record = {"video": path, "width": width, "height": height, "fps": float(fps)}
            record["frames"] = [{"frame": i, "detections": found} for i, found in enumerate(frames)]
            with replaced_when_done(json_path) as json_temporary, open(json_temporary, "w") as f:
                json.dump(record, f, indent=1)
    except av.FFmpegError as error:
        raise VideoError(f"PyAV cannot read or write it ({error})") from None
    for i, found in enumerate(frames):
        entries.append({"file_name": path, "frame": i, "width": width, "height": height, "found": found})
    return entries


def _detect_frames(model, processor, images, threshold, top_k, keep, encoder, target) -> list[list[dict]]:
    """A batch of a video's frames: their detections, each frame drawn and encoded into `target`."""
    import av

    detections, _ = detect(model, processor, images, threshold, top_k)
    detections = [of_classes(found, keep) for found in detections]
    for image, found in zip(images, detections):
        for packet in encoder.encode(av.VideoFrame.from_image(draw_detections(image, found))):
            target.mux(packet)
    return detections
