"""torch.compile and torch.export of the model give the eager outputs."""

import torch

from tests.support.models import tiny_model


def test_torch_compile_matches_eager():
    model = tiny_model(with_box_refine=True)
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    assert (eager.logits - compiled.logits).abs().max() <= 1e-4
    assert (eager.pred_boxes - compiled.pred_boxes).abs().max() <= 1e-4


def test_torch_export_of_inference():
    model = tiny_model()
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 96, 128, dtype=torch.long)
    program = torch.export.export(model, (x, mask))
    with torch.no_grad():
        eager = model(x, mask)
    exported = program.module()(x, mask)
    assert torch.equal(eager.logits, exported.logits) and torch.equal(eager.pred_boxes, exported.pred_boxes)
    assert any("ms_deform_attn_cpu" in str(node.target) for node in program.graph.nodes)
