"""transformers' own common tests (ModelTesterMixin, ImageProcessingTestMixin, ConfigTester) of the installed
transformers version, run on our classes: what transformers' CI asks of every model, asked of ours.

The mixins come from transformers' sdist on PyPI, fetched once and cached (tests/support/transformers_sources.py); the
module skips when they cannot be had. The tester below is ours: tiny configs of our model, not transformers' tester.
Every mixin test our classes do not pass is listed, with its reason, in SKIPPED or KNOWN_FAILURES.
"""

import math
import os
import re
import subprocess
import sys
import unittest
from pathlib import Path

import pytest
import torch
from transformers import ResNetConfig

from deformable_detr import (
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    DeformableDetrImageProcessor,
    DeformableDetrModel,
)
from tests.support.transformers_sources import SourcesUnavailable, import_mixin_module

pytest.importorskip("parameterized", reason="transformers' test_modeling_common.py imports parameterized")
try:
    modeling_common = import_mixin_module("test_modeling_common")
    image_processing_common = import_mixin_module("test_image_processing_common")
    configuration_common = import_mixin_module("test_configuration_common")
except SourcesUnavailable as error:
    pytest.skip(f"transformers' test mixins unavailable: {error}", allow_module_level=True)

# The one place for mixin tests our classes do not pass. A name covers that test and its parameterized cases
# (the name, then "_" and a number).
# Skipped: about things Deformable DETR does not have (transformers' own Deformable DETR tests skip them too), or
# needing files transformers' sdist does not ship.
SKIPPED = {
    "test_inputs_embeds": "images in, no input embeddings",
    "test_inputs_embeds_matches_input_ids": "images in, no input ids to embed",
    "test_model_get_set_embeddings": "no token embeddings to get or set",
    "test_resize_tokens_embeddings": "no token embeddings",
    "test_feed_forward_chunking": "feed-forward chunking is not implemented (nor in transformers' Deformable DETR)",
    "test_generate_without_input_ids": "not a generative model",
    "test_processor_can_use_legacy_annotation_format": "reads tests/fixtures/tests_samples/COCO: not in the sdist",
    "test_backends_equivalence": "reads an image from the Hub (hf-internal-testing/fixtures-coco); tests are offline",
}

# Failing today, each with why: xfail(strict), so that a fix shows as XPASS and its entry must go.
KNOWN_FAILURES = {}


def _listed(name, table):
    return next((reason for key, reason in table.items() if re.fullmatch(rf"{key}(_\d+.*)?", name)), None)


def _apply_lists(cls):
    """Marks the tests named in SKIPPED skipped and those in KNOWN_FAILURES xfail(strict)."""
    for name in dir(cls):
        if not name.startswith("test_"):
            continue
        if (reason := _listed(name, SKIPPED)) is not None:
            setattr(cls, name, unittest.skip(reason)(getattr(cls, name)))
        elif (reason := _listed(name, KNOWN_FAILURES)) is not None:
            setattr(cls, name, pytest.mark.xfail(reason=reason, strict=True)(getattr(cls, name)))
    return cls


class TinyDeformableDetrTester:
    """Tiny configs and random inputs of our model for transformers' ModelTesterMixin.

    A 4-stage ResNet backbone of 8-32 channels (three levels from its last three stages, a fourth by a stride-2
    convolution), 2 encoder and 2 decoder layers of width 32, 5 queries, on 2 images of 96 x 96: the smallest
    level is then 2 x 2 (at 1 x 1, the GroupNorm of its input projection has one value per group and refuses to train).
    """

    def __init__(self, parent, batch_size=2, image_size=96, num_queries=5, num_labels=4):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_channels = 3
        self.num_queries = num_queries
        self.num_labels = num_labels
        self.hidden_size = 32  # GroupNorm(32) in the input projections
        self.num_hidden_layers = 2
        self.num_attention_heads = 2
        self.num_feature_levels = 4
        self.encoder_n_points = 2
        self.decoder_n_points = 3
        self.n_targets = 3
        self.is_training = True
        # one query per position of the 4 levels (strides 8, 16, 32, 64)
        self.encoder_seq_length = sum(math.ceil(image_size / stride) ** 2 for stride in (8, 16, 32, 64))
        self.seq_length = self.encoder_seq_length
        self.decoder_seq_length = num_queries

    def get_config(self):
        backbone_config = ResNetConfig(
            embeddings_size=8,
            hidden_sizes=[8, 16, 24, 32],
            depths=[1, 1, 1, 1],
            out_features=["stage2", "stage3", "stage4"],
        )
        return DeformableDetrConfig(
            backbone_config=backbone_config,
            d_model=self.hidden_size,
            encoder_layers=self.num_hidden_layers,
            decoder_layers=self.num_hidden_layers,
            encoder_attention_heads=self.num_attention_heads,
            decoder_attention_heads=self.num_attention_heads,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            num_feature_levels=self.num_feature_levels,
            encoder_n_points=self.encoder_n_points,
            decoder_n_points=self.decoder_n_points,
            num_queries=self.num_queries,
            two_stage_num_proposals=self.num_queries,
            num_labels=self.num_labels,
        )

    def prepare_config_and_inputs_for_common(self):
        pixel_values = torch.rand(self.batch_size, self.num_channels, self.image_size, self.image_size)
        pixel_mask = torch.ones(self.batch_size, self.image_size, self.image_size, dtype=torch.long)
        return self.get_config(), {"pixel_values": pixel_values, "pixel_mask": pixel_mask}

    def labels(self):
        """One target per image: `n_targets` classes and (cx, cy, w, h) boxes inside the image, the same at every
        call (the mixin compares two calls' losses)."""
        generator = torch.Generator().manual_seed(0)
        targets = []
        for _ in range(self.batch_size):
            centers = torch.rand(self.n_targets, 2, generator=generator) * 0.5 + 0.25
            sizes = torch.rand(self.n_targets, 2, generator=generator) * 0.2 + 0.05
            classes = torch.randint(self.num_labels, (self.n_targets,), generator=generator)
            targets.append({"class_labels": classes, "boxes": torch.cat([centers, sizes], dim=1)})
        return targets


@_apply_lists
class DeformableDetrModelTest(modeling_common.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (DeformableDetrModel, DeformableDetrForObjectDetection)
    is_encoder_decoder = True

    def setUp(self):
        self.model_tester = TinyDeformableDetrTester(self)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class is DeformableDetrForObjectDetection:
            inputs_dict["labels"] = self.model_tester.labels()
        return inputs_dict

    def test_attention_outputs(self):
        """Deformable attention has no query-key matrix: its weights are (batch, queries, heads, levels, points), as
        in transformers' Deformable DETR (whose tests override this mixin test too); the decoder's self-attention
        is ordinary, and eager (sdpa returns no weights). Asked by argument and by config."""
        tester = self.model_tester
        config, inputs = tester.prepare_config_and_inputs_for_common()
        batch, heads, queries = tester.batch_size, tester.num_attention_heads, tester.num_queries
        levels = tester.num_feature_levels
        expected = {
            "encoder_attentions": (batch, tester.encoder_seq_length, heads, levels, tester.encoder_n_points),
            "decoder_attentions": (batch, heads, queries, queries),
            "cross_attentions": (batch, queries, heads, levels, tester.decoder_n_points),
        }
        for model_class in self.all_model_classes:
            model = model_class._from_config(config, attn_implementation="eager").eval()
            for by_config in (False, True):
                model.config.output_attentions = by_config
                with torch.no_grad():
                    outputs = model(**inputs, **({} if by_config else {"output_attentions": True}))
                for name, shape in expected.items():
                    attentions = getattr(outputs, name)
                    self.assertEqual(len(attentions), tester.num_hidden_layers, name)
                    self.assertEqual([tuple(a.shape) for a in attentions], [shape] * tester.num_hidden_layers, name)

    def test_config(self):
        tester = configuration_common.ConfigTester(
            self,
            config_class=DeformableDetrConfig,
            has_text_modality=False,
            common_properties=["num_channels", "d_model", "encoder_attention_heads", "decoder_attention_heads"],
        )
        tester.run_common_tests()


class TinyImageProcessingTester(image_processing_common.ImageProcessingTester):
    """Small sizes for the processor tests: shortest edge 18 (longest 1333, never reached by the 30-400 inputs)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("size", {"shortest_edge": 18, "longest_edge": 1333})
        kwargs.setdefault("image_mean", [0.5, 0.5, 0.5])
        kwargs.setdefault("image_std", [0.5, 0.5, 0.5])
        kwargs.setdefault("do_pad", True)
        super().__init__(**kwargs)

    def _get_image_processing_classes(self):
        # transformers looks the classes up by the test file's folder name; ours is one class, which deformable_detr
        # registers for both of transformers' backends
        return {"pil": DeformableDetrImageProcessor, "torchvision": DeformableDetrImageProcessor}


@_apply_lists
class DeformableDetrImageProcessingTest(
    image_processing_common.AnnotationFormatTestMixin,
    image_processing_common.ImageProcessingTestMixin,
    unittest.TestCase,
):
    image_processor_tester_class = TinyImageProcessingTester


@pytest.mark.skipif(
    not os.environ.get("TRANSFORMERS_EXAMPLES"),
    reason="set TRANSFORMERS_EXAMPLES to a folder with transformers' examples/pytorch/object-detection scripts "
    "(they are not on PyPI); they need albumentations, torchmetrics and torchvision",
)
def test_transformers_example_scripts_train_and_save_our_model(tmp_path):
    """transformers' object-detection examples, unmodified, train, evaluate and save a tiny model of ours, and the
    saved folder loads with trust_remote_code where our package cannot be imported.

    See scripts/run_transformers_examples.py."""
    runner = Path(__file__).parent.parent / "scripts" / "run_transformers_examples.py"
    command = [sys.executable, str(runner), "--examples", os.environ["TRANSFORMERS_EXAMPLES"], "--work", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
