"""Module-tree pictures and parameter counts (OpenDelta's ``Visualization`` and ``delta.log()``).

Sizes are logical (``engine.logical_shape``), so a ZeRO-3 or FSDP model shows its full shapes, not
its empty local shards. Names are canonical: engine wrapper segments (``_fsdp_wrapped_module``,
``_orig_mod``, a DDP root's ``module``) are left out. Repeated blocks (``layer.0`` ... ``layer.11``
with identical subtrees) are folded into one node ``0-11``.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text
from rich.tree import Tree
from torch import nn

from deltadist.addressing.common import common_name_index, families
from deltadist.addressing.names import WRAPPER_SEGMENTS
from deltadist.core.attach import delta_parameter_ids
from deltadist.core.delta_module import DeltaModule
from deltadist.core.naming import deltas_on
from deltadist.engines import Engine, detect_engine
from deltadist.mechanisms.copies import TrainedCopy

_WIDTH = 240
"""Width of the returned text: wide enough that tree lines are not wrapped."""

_PARAM_STYLES = {
    "delta": "magenta", "frozen delta": "dim magenta", "trainable": "blue", "frozen": "bright_black",
}

Shape = tuple[int, ...]


@dataclass
class ModuleNode:
    """One shown module: its name, class, own parameters and shown children."""

    name: str
    cls: str
    is_delta: bool
    params: list[tuple[str, Shape, str]]
    """``(name, logical shape, kind)``; kind is a key of ``_PARAM_STYLES``."""
    children: list[ModuleNode] = field(default_factory=list)
    commons: tuple[str, ...] = ()
    count: int = 1
    """How many identical sibling blocks this node stands for."""
    has_params: bool = False
    signature: tuple[Any, ...] = ()
    """Structure of the subtree (names, classes, shapes, kinds); equal for foldable blocks."""
    paths: tuple[str, ...] = ()
    """Canonical names of the modules this node stands for: one, or one per block of a fold."""
    members: list[ModuleNode] = field(default_factory=list)
    """For a folded node: one node per block it stands for, in order (the unfolded view)."""


@dataclass
class _Builder:
    """Walks a module tree into ``ModuleNode``s with one call's options."""

    engine: Engine
    index: dict[str, tuple[str, ...]]
    keep_non_params: bool
    only_common: bool

    def build(self, module: nn.Module, name: str, path: str, in_delta: bool) -> ModuleNode | None:
        """The node of ``module`` at canonical ``path``, or ``None`` if it is hidden."""
        in_delta = in_delta or isinstance(module, DeltaModule)
        params, children = _contents(module)
        kids = []
        for child_name, child in children:
            child_path = f"{path}.{child_name}" if path else child_name
            node = self.build(child, child_name, child_path, in_delta)
            if node is not None:
                kids.append(node)
        own = [(n, tuple(self.engine.logical_shape(p)), _kind(p, in_delta)) for n, p in params]
        node = ModuleNode(
            name=name, cls=type(module).__name__, is_delta=isinstance(module, DeltaModule),
            params=own, children=kids, commons=self.index.get(path, ()),
            has_params=bool(own) or any(k.has_params for k in kids), paths=(path,),
        )
        node.signature = (node.cls, node.is_delta, tuple(own),
                          tuple((k.name, k.signature) for k in kids))
        if path and not (self.keep_non_params or node.has_params):
            return None
        if path and self.only_common and not (node.commons or kids):
            return None
        return node


def _contents(module: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Module]]]:
    """Own parameters and children of ``module``, with wrapper segments spliced away."""
    params = [(n, p) for n, p in module._parameters.items() if p is not None]
    children: list[tuple[str, nn.Module]] = []
    for name, child in module._modules.items():
        if child is None:
            continue
        if name in WRAPPER_SEGMENTS:
            inner_params, inner_children = _contents(child)
            params += inner_params
            children += inner_children
        else:
            children.append((name, child))
    return params, children


def _kind(param: nn.Parameter, in_delta: bool) -> str:
    if in_delta:
        return "delta" if param.requires_grad else "frozen delta"
    return "trainable" if param.requires_grad else "frozen"


def _fold(node: ModuleNode) -> ModuleNode:
    """Fold runs of identical siblings with consecutive integer names into one node."""
    runs: list[list[ModuleNode]] = []
    for child in (_fold(c) for c in node.children):
        last = runs[-1][-1] if runs else None
        if last is not None and _consecutive(last.name, child.name) \
                and child.signature == runs[-1][0].signature:
            runs[-1].append(child)
        else:
            runs.append([child])
    folded = [run[0] if len(run) == 1 else
              replace(_overlay(run), name=f"{run[0].name}-{run[-1].name}", count=len(run), members=run)
              for run in runs]
    return replace(node, children=folded)


def _consecutive(a: str, b: str) -> bool:
    return a.isdigit() and b.isdigit() and int(b) == int(a) + 1


def _overlay(nodes: list[ModuleNode]) -> ModuleNode:
    """One node standing for same-structure ``nodes`` (one per block of a fold), named as the first.

    Common names get index ranges; paths are all the nodes' paths, and so are those of every
    child and of every member of a fold inside (so selecting it in a folded view selects them all).
    """
    if len(nodes) == 1:
        return nodes[0]
    first, last = nodes[0], nodes[-1]
    return replace(
        first,
        commons=tuple(_span(a, b) for a, b in zip(first.commons, last.commons)),
        paths=tuple(path for node in nodes for path in node.paths),
        children=[_overlay(list(column)) for column in zip(*(n.children for n in nodes))],
        members=[_overlay(list(column)) for column in zip(*(n.members for n in nodes))],
    )


def _span(first: str, last: str) -> str:
    """``encoder.block.0.attn`` and ``encoder.block.3.attn`` -> ``encoder.block.0-3.attn``."""
    a, b = first.split("."), last.split(".")
    if len(a) != len(b):
        return first
    return ".".join(x if x == y else f"{x}-{y}" for x, y in zip(a, b))


def _label(node: ModuleNode, show_commons: bool) -> Text:
    numbered = node.name[:1].isdigit()
    text = Text(node.name, style="red" if numbered else "white")
    if show_commons and node.commons:
        text.append(" <" + ", ".join(node.commons) + ">", style="cyan")
    text.append(f" ({node.cls})", style="magenta" if node.is_delta else "green")
    if node.is_delta:
        text.append(" [delta]", style="magenta")
    if node.count > 1:
        text.append(f" ×{node.count}", style="red")
    for name, shape, kind in node.params:
        text.append(f" {name}:{list(shape)}", style=_PARAM_STYLES[kind])
    return text


def _add(parent: Tree, node: ModuleNode, show_commons: bool) -> None:
    branch = parent.add(_label(node, show_commons))
    for child in node.children:
        _add(branch, child, show_commons)


def _emit(renderable: RenderableType, echo: bool) -> str:
    """Plain text of ``renderable``; also printed (in colour on a terminal) when ``echo``."""
    buffer = io.StringIO()
    Console(file=buffer, width=_WIDTH, color_system=None).print(renderable)
    text = "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"
    if echo:
        console = Console()
        if console.is_terminal:
            console.print(renderable)
        else:
            sys.stdout.write(text)
    return text


def module_tree(model: nn.Module, engine: Engine, *, keep_non_params: bool = False, rootname: str = "root",
                fold: bool = True, commons: bool = False, only_common: bool = False) -> ModuleNode:
    """The tree of shown modules of ``model`` (what :class:`Visualization` draws), as data.

    Args:
        model: the model (a DDP-style root holding only ``module`` is looked through).
        engine: gives logical shapes.
        keep_non_params: also keep modules without parameters.
        rootname: name of the root node.
        fold: fold repeated blocks (``0-11 ×12``); the folded nodes keep their blocks as ``members``.
        commons: fill in each node's common-structure names.
        only_common: keep only modules with a common-structure name and their ancestors.
    """
    root = model
    if list(root._modules) == ["module"]:
        root = root.module
    index = common_name_index(root) if commons or only_common else {}
    node = _Builder(engine, index, keep_non_params, only_common).build(root, rootname, "", False)
    assert node is not None  # the root is never hidden
    return _fold(node) if fold else node


class Visualization:
    """Module-tree view of a model, with delta modules and parameters marked.

    Args:
        plm: the model (any ``nn.Module``, wrapped by an engine or not).
        engine: the engine giving logical shapes (default: detected from ``plm``).
    """

    def __init__(self, plm: nn.Module, engine: Engine | None = None) -> None:
        self.plm = plm
        self.engine = engine if engine is not None else detect_engine(plm)

    def build_tree(self, keep_non_params: bool = False, rootname: str = "root",
                   expand_params: bool = False, common_structure: bool = False,
                   only_common: bool = False) -> Tree:
        """The rich ``Tree`` that :meth:`structure_graph` prints (arguments as there)."""
        show_commons = common_structure or only_common
        node = module_tree(self.plm, self.engine, keep_non_params=keep_non_params, rootname=rootname,
                           fold=not expand_params, commons=show_commons, only_common=only_common)
        tree = Tree(_label(node, show_commons))
        for child in node.children:
            _add(tree, child, show_commons)
        return tree

    def structure_graph(self, keep_non_params: bool = False, rootname: str = "root",
                        expand_params: bool = False, common_structure: bool = False,
                        only_common: bool = False, printTree: bool = True) -> str:
        """Print (when ``printTree``) and return the model's module tree.

        Each node shows its name (white), class (green; magenta and ``[delta]`` for delta
        modules) and own parameters as ``name:[logical shape]``: trainable blue, frozen grey,
        delta magenta. Identical blocks with consecutive integer names are folded (``0-11 ×12``).

        Args:
            keep_non_params: also show modules without parameters (dropouts, activations).
            rootname: label of the root node.
            expand_params: show every block instead of folding repeated ones.
            common_structure: show common-structure names (``<encoder.block.0-11.attn.q>``).
            only_common: show only modules with a common-structure name and their ancestors.
            printTree: print the tree to stdout.
        """
        tree = self.build_tree(keep_non_params, rootname, expand_params, common_structure, only_common)
        return _emit(tree, printTree)


def parameter_summary(module: nn.Module, engine: Engine, delta_ids: set[int] | None = None) -> dict[str, int]:
    """Logical parameter counts of ``module`` (shared parameters counted once).

    Args:
        module: the model.
        engine: gives logical shapes.
        delta_ids: ``id()`` of the parameters to count as ``delta`` (one delta's record);
            default: the parameters of every delta module in ``module`` but trained copies.

    Returns:
        ``total``, ``trainable`` (``requires_grad``), ``delta``, ``backbone`` (``total`` minus
        every delta's parameters, trained copies of task heads included) and ``sites`` (modules
        a delta modifies; a module served by a trained copy is not one).
    """
    params = {id(p): p for p in module.parameters()}
    every_delta = delta_parameter_ids(module)
    copies = {id(p) for m in module.modules() if isinstance(m, TrainedCopy) for p in m.parameters()}
    sizes = {key: engine.logical_shape(p).numel() for key, p in params.items()}
    total = sum(sizes.values())
    counted = every_delta - copies if delta_ids is None else delta_ids
    sites = sum(
        1 for m in module.modules()
        if not isinstance(m, DeltaModule)
        and any(isinstance(c, DeltaModule) and not isinstance(c, TrainedCopy) for c in m.children())
    )
    return {
        "total": total,
        "trainable": sum(sizes[key] for key, p in params.items() if p.requires_grad),
        "delta": sum(sizes[key] for key in counted if key in sizes),
        "backbone": total - sum(sizes[key] for key in every_delta if key in sizes),
        "sites": sites,
    }


def _ratio(part: int, whole: int, of: str) -> str:
    return f"{100 * part / whole:.4f}% of {of}" if whole else f"n/a (no {of} parameters)"


def _summary_table(title: str, summary: dict[str, int], found: list[str], kept: list[str],
                   delta_ratio: bool, trainable_ratio: bool, names: tuple[str, str] = ("", "")) -> Table:
    table = Table(title=title, show_header=False, box=box.SIMPLE, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column()
    if names[0]:
        table.add_row("Delta name", names[0], names[1])
    table.add_row("Total parameters", f"{summary['total']:,}", "")
    table.add_row("Backbone parameters", f"{summary['backbone']:,}", "")
    table.add_row("Trainable parameters", f"{summary['trainable']:,}",
                  _ratio(summary["trainable"], summary["total"], "total") if trainable_ratio else "")
    table.add_row("Delta parameters", f"{summary['delta']:,}",
                  _ratio(summary["delta"], summary["backbone"], "backbone") if delta_ratio else "")
    table.add_row("Delta sites", f"{summary['sites']:,}", "")
    if kept:
        table.add_row("Trained backbone modules", ", ".join(kept), "saved with the delta")
    if found:
        table.add_row("Model families", ", ".join(found), "")
    return table


def log_delta(delta: Any, module: nn.Module, delta_ratio: bool = True,
              trainable_ratio: bool = True, visualization: bool = True) -> str:
    """Print and return ``module``'s tree (if ``visualization``) and its parameter summary.

    Args:
        delta: the delta object (a ``DeltaBase``); its ``engine`` gives logical sizes.
        module: the model to report on (usually ``delta.backbone_model``).
        delta_ratio: show delta parameters as a share of backbone parameters.
        trainable_ratio: show trainable parameters as a share of all parameters.
        visualization: include the module tree.
    """
    parts: list[RenderableType] = []
    if visualization:
        parts.append(Visualization(module, engine=delta.engine).build_tree())
    title = f"{type(delta).__name__} on {type(module).__name__}"
    record = delta.record
    summary = parameter_summary(module, delta.engine, {id(p) for p in record.delta_parameters().values()})
    kept = list(dict.fromkeys(name.rpartition(".")[0] or name for name in record.kept_backbone))
    others = [f"{n} ({d.delta_type}, {d.state})" for n, d in deltas_on(delta.backbone_model).items()
              if d is not delta]
    names = (delta.name, "other deltas on the model: " + ", ".join(others) if others else "")
    parts.append(_summary_table(title, summary, families(module), kept, delta_ratio, trainable_ratio, names))
    return _emit(Group(*parts), echo=True)
