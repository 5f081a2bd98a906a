"""A block as the service describes it: the BlockInfo that CreateBlocks, Push, InitBlocks,
ListBlocks, Restore and AttachShared answer with.
"""

from __future__ import annotations

from downpour.paramserver.store import Block
from downpour.v1 import common_pb2
from downpour.v1 import paramserver_pb2 as pb


def block_info(b: Block) -> pb.BlockInfo:
    return pb.BlockInfo(
        name=b.name, dtype=common_pb2.DTYPE_FLOAT32, shape=b.shape, num_elements=b.size, version=b.version
    )
