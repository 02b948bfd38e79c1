"""An exponential moving average of the weights (``train.ema: 0.999``).

torch's :class:`~torch.optim.swa_utils.AveragedModel` with ``get_ema_multi_avg_fn(decay)``
over the parameters: its first update copies the model, each later one sets
``ema = decay * ema + (1 - decay) * weights``. Buffers that are saved with the model and hold
floats (BatchNorm running statistics, fitted normalization) are averaged the same way; the
others are constants the towers derive when built (open_clip's causal attention mask of
``-inf``, mel filterbanks) or counters, and are copied: averaging a ``-inf`` mask gives NaN.
It is updated after every optimizer step that happened (a step skipped as non-finite, or by
the fp16 gradient scaler, does not count), by a post-step hook of the optimizer. The trainer
validates the average, saves it in every checkpoint (``ema.safetensors``, so a resumed run
continues it exactly) and writes it as the final model.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(1, 1, bias=False)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    >>> ema = attach_ema(model, optimizer, 0.5)
    >>> for _ in range(2):
    ...     model(torch.ones(1, 1)).sum().backward()
    ...     optimizer.step()
    ...     optimizer.zero_grad()
    >>> # w1 = w0 - 1, w2 = w0 - 2; ema1 = w1, ema2 = (w1 + w2) / 2
    >>> round(float(model.weight.detach() - ema.module.weight), 4)
    -0.5
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def attach_ema(
    model: nn.Module, optimizer: torch.optim.Optimizer, decay: float | None
) -> AveragedModel | None:
    """An EMA copy of ``model`` (on its device) updated after each step of ``optimizer``
    (an Accelerate-wrapped one too); ``None`` when ``decay`` is ``None``."""
    if decay is None:
        return None
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    average.requires_grad_(False)
    averaged = averaged_buffers(average.module)
    base = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer

    def update(*_: Any) -> None:
        weight = 1.0 if int(average.n_averaged) == 0 else 1.0 - decay  # the first one copies
        average.update_parameters(model)
        with torch.no_grad():
            for (name, mine), theirs in zip(average.module.named_buffers(), model.buffers()):
                if name in averaged:
                    mine.lerp_(theirs.to(mine.dtype), weight)
                else:
                    mine.copy_(theirs)

    base.register_step_post_hook(update)
    return average


def averaged_buffers(module: nn.Module) -> set[str]:
    """Names of the buffers of ``module`` that an EMA averages: floating point and saved with
    the model (``persistent``); the rest are copied (see the module docstring).

    Example:
        >>> sorted(averaged_buffers(nn.BatchNorm1d(2)))
        ['running_mean', 'running_var']
    """
    saved = set(module.state_dict())
    return {
        name
        for name, buffer in module.named_buffers()
        if buffer.is_floating_point() and name in saved
    }
