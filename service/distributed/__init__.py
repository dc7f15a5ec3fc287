"""Distributed mode: the same REST API on a Ray cluster (``adamscope serve --ray``).

- :mod:`.host`: a Ray actor that runs the single-process service (the real app, its
  engine, persistence and observers) for one **slot**: a numbered place for steppers whose
  files live in ``<data dir>/hosts/slot-<k>``. An actor that dies is replaced by a new one
  for the same slot, which restores the slot's steppers from those files.
- :mod:`.cluster`: the slots, their actors, placement, recovery and the sharded steppers'
  records (``<data dir>/sharded``).
- :mod:`.ingress`: the Ray Serve ingress, a FastAPI app that routes each request to the
  slot that holds its stepper, and fans a sharded stepper's requests out to its shards.
- :mod:`.shards`: splitting tensor bodies by shard and merging the replies.
"""
