"""Plumbing every downpour service shares: the tensor codec (``codec``), client
channels (``channel``) and the one server skeleton (``server``)."""
