"""Inspection: what is seen of an optimizer's state, whoever owns it.

Signals (:mod:`.signals`, computed by :mod:`.kernels`), statistics (:mod:`.summary`,
:mod:`.stats`) of tensors and of Adam's derived views (:mod:`.views`), the history of every
step and its alerts (:mod:`.history`, :mod:`.recorder`, :mod:`.alerts`; the whole run in
SQLite, downsampled into tiers: :mod:`.history_store`, :mod:`.tiers`, :mod:`.span`), diffs
(:mod:`.diff`) and dry runs (:mod:`.dryrun`). Everything reads an optimizer through
:class:`~.optimizer.OptimizerState`: a hosted stepper implements it today. Nothing here
knows HTTP.
"""
