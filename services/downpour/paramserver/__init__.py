"""The parameter server: one shard of named float32 blocks with Adagrad.

``store`` holds the state, ``checkpoint`` writes and reads it atomically,
``server`` is the gRPC service (``downpour serve paramserver``), ``client``
the small ps-lite-like client (pull, push -> ticket, wait) over all shards.
"""
