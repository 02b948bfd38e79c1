"""A tower's stack of blocks: what ``trainable: {last_blocks: N}``, ``train.layer_decay`` and
gradient checkpointing of our own towers count in.

Every parameter of a tower falls in one of three parts, by name:

- the **blocks**, input to output: open_clip's ``transformer.resblocks`` (ViT and text),
  a Hugging Face encoder's layer list (``encoder.layer``, ``layers``, ...), the audio
  transformer's and CNN's layers, the GNN's convolutions (with the norm that follows each),
  ``layer1..layer4`` of open_clip's ModifiedResNet, the stages of a timm trunk. Found as the
  ``ModuleList``/``Sequential`` of one class holding the most parameters (the shallowest
  on a tie); sibling lists of the same parent (a GNN's ``norms`` beside its ``convs``) join
  block by block;
- the **stem**: parameters registered before the first block (patch and token embeddings,
  positional embeddings, the pre-norm);
- the **head**: parameters registered after the last block (final norms, attention pooling,
  a Hugging Face pooler), and open_clip's ``proj`` / ``text_projection`` (parameters of the
  blocks' own ancestors go by name: those named ``*proj*`` are head, the others stem).

A tower without such a stack (the tabular MLP) has no layout.

Example:
    >>> from mmalign.towers import build_tower
    >>> tower = build_tower({"type": "image", "embed_dim": 8, "vision_cfg": {"image_size": 16,
    ...     "patch_size": 8, "width": 16, "layers": 3, "head_width": 8}})
    >>> layout = tower_layout(tower)
    >>> layout.blocks
    [['visual.transformer.resblocks.0.'], ['visual.transformer.resblocks.1.'], \
['visual.transformer.resblocks.2.']]
    >>> [layout.depth(f"visual.{name}") for name in ("conv1.weight", "class_embedding",
    ...     "transformer.resblocks.1.ln_1.weight", "ln_post.weight", "proj")]
    [0, 0, 2, 4, 4]
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mmalign.errors import ConfigError

_STACKS = (nn.ModuleList, nn.Sequential)


@dataclass(frozen=True)
class TowerLayout:
    """The blocks of a tower (each a list of parameter-name prefixes) and the names of
    its parameters in registration order (to place the stem and the head)."""

    blocks: list[list[str]]
    names: list[str]

    def block_of(self, name: str) -> int | None:
        """The index of the block holding parameter ``name``, ``None`` outside the blocks."""
        for index, prefixes in enumerate(self.blocks):
            if name.startswith(tuple(prefixes)):
                return index
        return None

    def depth(self, name: str) -> int:
        """0 for the stem, ``i + 1`` for block ``i``, ``len(blocks) + 1`` for the head."""
        block = self.block_of(name)
        if block is not None:
            return block + 1
        return len(self.blocks) + 1 if self._in_head(name) else 0

    def _in_head(self, name: str) -> bool:
        owner, _, leaf = name.rpartition(".")
        if not owner or self.blocks[0][0].startswith(f"{owner}."):
            # a module's own parameters come before its children's in named_parameters, so
            # those of the blocks' ancestors go by name: projections are on top
            return "proj" in leaf
        first = next(i for i, other in enumerate(self.names) if self.block_of(other) is not None)
        return self.names.index(name) > first

    def top(self, count: int) -> list[str]:
        """Parameter names of the last ``count`` blocks and of the head."""
        cut = len(self.blocks) + 1 - count
        return [name for name in self.names if self.depth(name) >= cut]


def _parameter_count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _stacks(tower: nn.Module) -> dict[str, nn.Module]:
    """Named ``ModuleList``/``Sequential`` modules of one class (at least two, with
    parameters): the candidate block stacks."""
    found = {}
    for name, module in tower.named_modules():
        children = list(module.children())
        if (
            isinstance(module, _STACKS)
            and len(children) >= 2
            and len({type(child) for child in children}) == 1
            and _parameter_count(module) > 0
        ):
            found[name] = module
    return found


def _resnet_stages(tower: nn.Module) -> list[str] | None:
    """``layer1..layer4`` of open_clip's ModifiedResNet (four stacks of unequal length)."""
    from open_clip.modified_resnet import ModifiedResNet

    for name, module in tower.named_modules():
        if isinstance(module, ModifiedResNet):
            return [f"{name}.layer{index}" for index in range(1, 5)]
    return None


def block_modules(tower: nn.Module) -> list[nn.Module]:
    """The modules of the block stack (empty without one), input to output."""
    modules = dict(tower.named_modules())
    return [modules[names[0]] for names in _block_names(tower)]


def _block_names(tower: nn.Module) -> list[list[str]]:
    """Module names of each block (one per sibling stack), input to output."""
    stages = _resnet_stages(tower)
    if stages is not None:
        return [[stage] for stage in stages]
    stacks = _stacks(tower)
    if not stacks:
        return []
    main = max(stacks, key=lambda name: (_parameter_count(stacks[name]), -name.count(".")))
    parent, _, own = main.rpartition(".")
    lists = {
        name: child
        for name, child in tower.get_submodule(parent).named_children()
        if isinstance(child, _STACKS) and name != own
    }
    named = [(main, stacks[main])]
    named += [(f"{parent}.{name}" if parent else name, child) for name, child in lists.items()]
    return [
        [f"{name}.{index}" for name, stack in named if index < len(stack)]
        for index in range(len(stacks[main]))
    ]


def tower_layout(tower: nn.Module) -> TowerLayout | None:
    """The :class:`TowerLayout` of ``tower``, ``None`` when it has no stack of blocks."""
    blocks = _block_names(tower)
    if not blocks:
        return None
    prefixes = [[f"{name}." for name in block] for block in blocks]
    names = [name for name, _ in tower.named_parameters()]
    return TowerLayout(prefixes, names)


def train_last_blocks(tower: nn.Module, count: int, field: str) -> None:
    """Freeze ``tower`` except its last ``count`` blocks and its head (``field`` names the
    tower's config, for errors).

    Example:
        >>> from mmalign.towers import build_tower
        >>> tower = build_tower({"type": "audio", "layers": 3, "width": 16, "heads": 2})
        >>> train_last_blocks(tower, 1, "model.towers.audio")
        >>> sorted({name.split(".")[3] for name, p in tower.named_parameters()
        ...     if p.requires_grad and ".layers." in name})
        ['2']
    """
    layout = tower_layout(tower)
    if layout is None:
        raise ConfigError(
            f"{field}.trainable.last_blocks: this {type(tower).__name__} has no stack of blocks "
            "to count; train it whole or freeze it with model.freeze"
        )
    if count > len(layout.blocks):
        raise ConfigError(
            f"{field}.trainable.last_blocks: {count} but the tower has {len(layout.blocks)} "
            f"blocks; use 0..{len(layout.blocks)}"
        )
    trained = set(layout.top(count))
    for name, parameter in tower.named_parameters():
        parameter.requires_grad_(name in trained)
