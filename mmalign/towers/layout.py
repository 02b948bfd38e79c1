"""A tower's stack of blocks (:meth:`mmalign.towers.Tower.blocks`) and what counts in it:
``trainable: {last_blocks: N}``, ``train.layer_decay``, gradient checkpointing and FSDP units.

:func:`stack_blocks` is the default discovery every tower inherits: the ``ModuleList`` /
``Sequential`` of one class holding the most parameters (the shallowest on a tie), each
member a block, input to output: open_clip's ``transformer.resblocks`` (ViT and text), a
Hugging Face encoder's layer list (``encoder.layer``, ``layers``, ...), the audio
transformer's and CNN's layers, the GNN's convolutions, the stages of a timm trunk. Sibling
lists of the same parent (a GNN's ``norms`` beside its ``convs``) join block by block. A
tower may override ``blocks()`` (the image tower returns ``layer1..layer4`` of open_clip's
ModifiedResNet).

Every parameter of a tower then falls in one of three parts, by name (:class:`TowerLayout`):

- the **blocks**;
- the **stem**: parameters registered before the first block (patch and token embeddings,
  positional embeddings, the pre-norm);
- the **head**: parameters registered after the last block (final norms, attention pooling,
  a Hugging Face pooler), and open_clip's ``proj`` / ``text_projection`` (parameters of the
  blocks' own ancestors go by name: those named ``*proj*`` are head, the others stem).

A tower without such a stack (the tabular MLP) has no blocks.

Example:
    >>> from mmalign.towers import build_tower
    >>> tower = build_tower({"type": "image", "embed_dim": 8, "vision_cfg": {"image_size": 16,
    ...     "patch_size": 8, "width": 16, "layers": 3, "head_width": 8}})
    >>> layout = tower_layout(tower, tower.blocks())
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

Block = list[nn.Module]
"""One block: the modules it is made of (usually one; a GNN layer is its convolution and the
norm after it)."""


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


def _stacks(module: nn.Module) -> dict[str, nn.Module]:
    """Named ``ModuleList``/``Sequential`` modules of one class (at least two, with
    parameters): the candidate block stacks."""
    found: dict[str, nn.Module] = {}
    for name, child in module.named_modules():
        members = list(child.children())
        if (
            isinstance(child, _STACKS)
            and len(members) >= 2
            and len({type(member) for member in members}) == 1
            and _parameter_count(child) > 0
        ):
            found[name] = child
    return found


def stack_blocks(module: nn.Module) -> list[Block]:
    """The blocks of ``module`` found as the module docstring says (empty without a stack).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
        >>> [len(block) for block in stack_blocks(net)]
        [1, 1]
    """
    stacks = _stacks(module)
    if not stacks:
        return []
    main = max(stacks, key=lambda name: (_parameter_count(stacks[name]), -name.count(".")))
    parent, _, own = main.rpartition(".")
    siblings = [
        child
        for name, child in module.get_submodule(parent).named_children()
        if isinstance(child, _STACKS) and name != own
    ]
    stacked = [list(stacks[main].children()), *(list(s.children()) for s in siblings)]
    return [
        [stack[index] for stack in stacked if index < len(stack)]
        for index in range(len(stacked[0]))
    ]


def tower_layout(tower: nn.Module, blocks: list[Block]) -> TowerLayout | None:
    """The :class:`TowerLayout` of ``tower`` with ``blocks`` (its ``blocks()``), ``None``
    without blocks."""
    if not blocks:
        return None
    names = {id(module): name for name, module in tower.named_modules()}
    prefixes = [[f"{names[id(module)]}." for module in block] for block in blocks]
    parameters = [name for name, _ in tower.named_parameters()]
    return TowerLayout(prefixes, parameters)


def train_last_blocks(tower: nn.Module, blocks: list[Block], count: int, field: str) -> None:
    """Freeze ``tower`` except its last ``count`` of ``blocks`` and its head (``field`` names
    the tower's config, for errors).

    Example:
        >>> from mmalign.towers import build_tower
        >>> tower = build_tower({"type": "audio", "layers": 3, "width": 16, "heads": 2})
        >>> train_last_blocks(tower, tower.blocks(), 1, "model.towers.audio")
        >>> sorted({name.split(".")[3] for name, p in tower.named_parameters()
        ...     if p.requires_grad and ".layers." in name})
        ['2']
    """
    layout = tower_layout(tower, blocks)
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
