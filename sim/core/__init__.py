"""The ground layer: what every other part of the simulator builds on.

The typed config (:mod:`.config`), errors (:mod:`.errors`), data loading, partitioning and
per-device splits (:mod:`.sources`, :mod:`.data`), the one training loop (:mod:`.training`),
seeding (:mod:`.seeding`), the on-disk cache (:mod:`.cache`), the stop signal (:mod:`.stop`), the
device-to-node layout (:mod:`.nodes`), failure schedules (:mod:`.faults`), metrics of pooled
evaluation records (:mod:`.metrics`), array-state helpers (:mod:`.arrays`), the spec a Flower
node builds its devices from (:mod:`.device_spec`) and one round's record (:mod:`.round_record`).

Nothing here imports from ``clients``, ``servers``, ``strategies`` or the rest of ``sim``: the
layers contract in pyproject.toml (``lint-imports``) enforces it. See docs/architecture.md.
"""
