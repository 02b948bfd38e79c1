"""The open_clip text tower encodes only up to the batch's last end-of-text token: the same
outputs and gradients as open_clip's full-context forward (in float64; in float32 they
differ by matmul rounding, about 1e-6)."""

from __future__ import annotations

import pytest
import torch

from mmalign.towers import build_tower

CAPTIONS = ["seven", "a handwritten digit seven on paper", "three", "le chiffre sept"]
EOT = 49407  # the BPE tokenizer's end-of-text id, also its largest


def tiny_text(**text_cfg: object) -> torch.nn.Module:
    torch.manual_seed(0)
    config = {"type": "text", "width": 32, "heads": 2, "layers": 2, "context_length": 24}
    tower = build_tower({**config, "embed_dim": 16, "text_cfg": text_cfg}, field="text")
    return tower.double()  # float64: the comparison sees the method, not matmul rounding


def batch(tower: torch.nn.Module) -> torch.Tensor:
    return tower.collate([tower.preprocess(caption) for caption in CAPTIONS])


def seen_lengths(tower: torch.nn.Module) -> list[int]:
    """Sequence lengths the transformer blocks receive, recorded per forward."""
    lengths: list[int] = []
    tower.encoder.module.transformer.register_forward_hook(
        lambda module, args, out: lengths.append(out.shape[1])
    )
    return lengths


def grads(tower: torch.nn.Module, out: torch.Tensor) -> dict[str, torch.Tensor]:
    tower.zero_grad()
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return {name: p.grad.clone() for name, p in tower.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("text_cfg", [{}, {"pool_type": "eos", "eos_id": EOT}])
def test_trimmed_forward_equals_full_context_outputs_and_gradients(text_cfg: dict) -> None:
    tower = tiny_text(**text_cfg)
    inputs = batch(tower)
    longest = int((inputs == EOT).int().argmax(dim=1).max()) + 1
    assert longest < inputs.shape[1]  # padding to drop
    lengths = seen_lengths(tower)
    full = tower.encoder.module(inputs)  # open_clip's own forward, all 24 positions
    full_grads = grads(tower, full)
    trimmed = tower(inputs)
    trimmed_grads = grads(tower, trimmed)
    assert lengths == [24, longest]
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-6)
    assert full_grads.keys() == trimmed_grads.keys() and len(full_grads) > 10
    for name, grad in full_grads.items():
        torch.testing.assert_close(trimmed_grads[name], grad, rtol=0, atol=1e-6, msg=name)
    # one caption alone is cut to its own length and gives its row of the batch
    torch.testing.assert_close(tower(inputs[:1]), full[:1], rtol=0, atol=1e-6)
    assert lengths[-1] == int((inputs[0] == EOT).int().argmax()) + 1


def test_last_token_pooling_keeps_the_full_context() -> None:
    tower = tiny_text(pool_type="last")
    inputs = batch(tower)
    lengths = seen_lengths(tower)
    out = tower(inputs)
    assert lengths == [24]
    torch.testing.assert_close(out, tower.encoder.module(inputs), rtol=0, atol=0)
    # trimming would change it: 'last' reads the padding's final position
    assert not torch.allclose(out, tower.encoder.module(inputs[:, :12]), atol=1e-3)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_tracing_keeps_the_full_context() -> None:
    tower = tiny_text().eval()
    inputs = batch(tower)
    lengths = seen_lengths(tower)
    traced = torch.jit.trace(tower, (inputs[:1],), check_trace=False)
    assert lengths == [24]  # traced with the whole context, not the example's length
    torch.testing.assert_close(traced(inputs), tower(inputs), rtol=0, atol=1e-6)


def test_compiling_keeps_the_full_context_in_one_graph() -> None:
    """Under ``torch.compile`` (``train.compile``) the cut length would be a data-dependent
    ``.item()``: a graph break (with dynamo's warning) and a recompilation per new length.
    The compiled forward keeps the whole context instead, in one graph, with the same
    outputs."""
    tower = tiny_text().eval()
    inputs = batch(tower)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(tower)(inputs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    lengths = seen_lengths(tower)
    compiled = torch.compile(tower, backend="eager")
    out = compiled(inputs)
    assert lengths == [24]  # not cut to the longest caption
    torch.testing.assert_close(out, tower.encoder.module(inputs), rtol=0, atol=1e-6)
    torch._dynamo.reset()
