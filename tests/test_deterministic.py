"""Deterministic training (--deterministic): the fused CPU kernel's gradients are bitwise equal run after run and
for any thread count (each (batch, head) pair's value gradient is summed by one thread, in a fixed order), and two
short training runs end with bitwise-equal weights."""

import torch
from safetensors.torch import load_file

from deformable_detr.engine import train
from deformable_detr.model.ms_deform_attn import multi_scale_deformable_attention_cpu
from tests.support.op_inputs import random_inputs
from tests.support.training import options


def kernel_gradients(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        value, shapes, locations, weights = random_inputs(
            [(24, 32), (12, 16), (6, 8)], B=2, Q=600, M=8, D=16, K=4, dtype=torch.float32, seed=4
        )
        for tensor in (value, locations, weights):
            tensor.requires_grad_(True)
        output = multi_scale_deformable_attention_cpu(value, shapes, locations, weights)
        output.backward(torch.randn(output.shape, generator=torch.Generator().manual_seed(5)))
        return [tensor.grad for tensor in (value, locations, weights)]
    finally:
        torch.set_num_threads(before)


def test_the_cpu_kernels_gradients_are_bitwise_repeatable_for_any_thread_count():
    first, again, one_thread = kernel_gradients(2), kernel_gradients(2), kernel_gradients(1)
    for a, b, c in zip(first, again, one_thread):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_two_deterministic_runs_end_with_the_same_weights(shapes_folder, tmp_path):
    for name in ("one", "two"):
        train(options(shapes_folder, tmp_path / name, max_steps=4, eval_every_epochs=0, deterministic=True))
    one, two = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "two"))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not torch.are_deterministic_algorithms_enabled()  # the process's setting is given back
