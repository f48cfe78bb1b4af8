"""Name-based addressing: patterns, canonical names, common structure maps (one per family, data)."""

from deltadist.addressing.select import Site
from deltadist.addressing.structures import StructureMap, register_structure_map

__all__ = ["Site", "StructureMap", "register_structure_map"]
