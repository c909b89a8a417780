"""DropBlock's internals, each job in its own module (the public op and modules are in ``drop_block``).

- :mod:`.sampling`: unkeyed seed draws and the one geometric-gap sampler;
  :mod:`.keyed_seeds`: the keyed seed rule (``draw_keyed_seeds``).
- :mod:`.calibration`: the seed rate ``gamma`` for each seeding.
- :mod:`.geometry`: :class:`~.geometry.Geometry` (sizes of the map, blocks and seed grid) and the
  write plans that turn seeds into dropped positions, sparse (:func:`~.geometry.block_plan`) or
  dense (:func:`~.geometry.grow_blocks`).
- :mod:`.scale`: the one scale policy (``expected``, ``realized``, ``none``).
- :mod:`.ops`: the ``spatialdrop::drop_block_*`` custom ops (sparse path), the dense static-shape
  path (CUDA, meta, export) and the dispatch between them.
- :mod:`.autograd`: the custom ops' autograd formula (the op itself) and vmap rule.
"""
