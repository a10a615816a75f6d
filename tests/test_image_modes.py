"""One rule for every way an image comes in (processor, training data, detect): 16-bit gray scaled to 8 bits,
transparency composited onto white, EXIF orientation applied."""

import numpy as np
import pytest
from PIL import Image

from deformable_detr import DeformableDetrImageProcessor
from deformable_detr.apps.detect import read_image
from deformable_detr.data.samples import DetectionSamples
from deformable_detr.model.image_processing_deformable_detr import to_rgb_array


def sixteen_bit_png(path) -> np.ndarray:
    """A 16-bit gray PNG with a horizontal ramp 0..65535; -> the 8-bit values it stands for."""
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(path)  # mode I;16
    return (ramp / 257).round().astype(np.uint8)


def transparent_png(path):
    """Red pixels, hidden behind alpha 0 on the left half, visible on the right half."""
    rgba = np.zeros((16, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:, 16:, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(path)


def samples_image(path):
    record = {"image": Image.open(path), "objects": {"bbox": [], "category": []}}
    return DetectionSamples([record])[0]["image"]


@pytest.mark.parametrize("read", [lambda p: to_rgb_array(Image.open(p)), read_image, samples_image])
def test_16_bit_gray_is_scaled_not_clipped(tmp_path, read):
    expected = sixteen_bit_png(tmp_path / "ramp.png")
    rgb = np.asarray(read(tmp_path / "ramp.png"))
    assert rgb.shape == (16, 64, 3) and np.abs(rgb.astype(int) - expected[..., None]).max() <= 1
    assert rgb.min() == 0 and rgb.max() == 255  # a ramp, not pure white


@pytest.mark.parametrize("read", [lambda p: to_rgb_array(Image.open(p)), read_image, samples_image])
def test_transparency_is_white_everywhere(tmp_path, read):
    transparent_png(tmp_path / "rgba.png")
    rgb = np.asarray(read(tmp_path / "rgba.png"))
    assert (rgb[:, :16] == 255).all()  # hidden red became white
    assert (rgb[:, 16:] == [255, 0, 0]).all()


def test_the_processor_sees_the_same_pixels_as_detect(tmp_path):
    sixteen_bit_png(tmp_path / "ramp.png")
    processor = DeformableDetrImageProcessor(do_resize=False)
    a = processor(Image.open(tmp_path / "ramp.png"), return_tensors="np")["pixel_values"]
    b = processor(read_image(tmp_path / "ramp.png"), return_tensors="np")["pixel_values"]
    assert np.array_equal(a, b)


def test_arrays_of_other_integer_types_mean_the_same_pixels():
    """A uint16 array or tensor is 16-bit (scaled to 8 bits, not taken as pixel values 257 times too large), a bool
    mask black and white, other integers 0..255 or an error naming the range."""
    import torch

    rgb = np.random.default_rng(0).integers(0, 256, (12, 16, 3)).astype(np.uint8)
    processor = DeformableDetrImageProcessor(do_resize=False)
    expected = processor(rgb, return_tensors="np")["pixel_values"]
    for image in (rgb.astype(np.uint16) * 257, torch.from_numpy(rgb.astype(np.uint16) * 257), rgb.astype(np.int64)):
        assert np.abs(processor(image, return_tensors="np")["pixel_values"] - expected).max() < 1e-5
    mask = np.zeros((12, 16), dtype=bool)
    mask[:, 8:] = True
    assert (to_rgb_array(mask)[:, :8] == 0).all() and (to_rgb_array(mask)[:, 8:] == 255).all()
    with pytest.raises(ValueError, match="image 0 is int32 with values from -5 to 300; give uint8"):
        processor(np.array([[-5, 300]], dtype=np.int32), return_tensors="np")
    # RGBA floats in 0..255 (the scale float images have here): transparency onto white
    rgba = np.zeros((4, 4, 4), dtype=np.float32)
    rgba[..., 0], rgba[:, 2:, 3] = 255.0, 255.0
    assert (to_rgb_array(rgba)[:, :2] == 255).all() and (to_rgb_array(rgba)[:, 2:] == [255, 0, 0]).all()
