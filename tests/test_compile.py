"""torch.compile and torch.export of the model give the eager outputs."""

import torch

from tests.support.models import tiny_model


def test_torch_compile_matches_eager_in_one_graph():
    """fullgraph: no graph break, although choosing the CPU kernel takes its build's lock, which torch.compile
    cannot trace."""
    model = tiny_model(with_box_refine=True)
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert (eager.logits - compiled.logits).abs().max() <= 1e-4
    assert (eager.pred_boxes - compiled.pred_boxes).abs().max() <= 1e-4


def test_torch_export_of_inference():
    """torch.export records the attention in standard ops (grid_sample), which any runtime runs, with dynamic
    sizes; eager mode keeps the fused kernel."""
    model = tiny_model()
    x = torch.randn(2, 3, 160, 192, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 160, 192, dtype=torch.long)
    height, width = (torch.export.Dim(name, min=128, max=4096) for name in ("height", "width"))
    batch = torch.export.Dim("batch", max=64)
    dims = {"pixel_values": {0: batch, 2: height, 3: width}, "pixel_mask": {0: batch, 1: height, 2: width}}
    program = torch.export.export(model, (x, mask), dynamic_shapes=dims)
    targets = [str(node.target) for node in program.graph.nodes]
    assert any("grid_sampler" in t for t in targets) and not any("ms_deform_attn" in t for t in targets)
    for size in ((160, 192), (224, 128)):  # the traced size and another
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
        mask = torch.ones(1, *size, dtype=torch.long)
        with torch.no_grad():
            eager = model(x, mask)
            exported = program.module()(x, mask)
        assert (eager.logits - exported.logits).abs().max() <= 1e-5
        assert (eager.pred_boxes - exported.pred_boxes).abs().max() <= 1e-5
