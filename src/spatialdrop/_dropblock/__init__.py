"""DropBlock's internals, each job in its own module (the public op and modules are in ``drop_block``).

- :mod:`.sampling`: unkeyed seed draws and the one geometric-gap sampler; :mod:`.keyed_seeds`:
  the keyed seed rule (``draw_keyed_seeds``); :mod:`.seeds`: ``draw_grid``, the one entry point
  both paths draw through.
- :mod:`.calibration`: the seed rate ``gamma`` for each seeding.
- :mod:`.geometry`: :class:`~.geometry.Geometry` (sizes of the map, blocks and seed grid) and the
  write plans that turn seeds into dropped positions, sparse (:func:`~.geometry.block_plan`) or
  dense (:func:`~.geometry.grow_blocks`).
- :mod:`.scale`: the one scale policy (``expected``, ``realized``, ``none``).
- :mod:`.sparse`: the custom ops ``spatialdrop::drop_block_maps`` / ``drop_block_shared`` (the
  CPU path: seeds drawn sparsely, only dropped positions written); :mod:`.planned`:
  ``spatialdrop::drop_block_maps_planned`` / ``drop_block_maps_replay`` (per channel, keeping the
  int32 write plan for backward when it is small).
- :mod:`.autograd`: :class:`~.autograd.DropBlockFunction` (torch.func-ready, backward = itself)
  and the ops' autograd formulas and vmap rules.
- :mod:`.ops`: the dispatch (:func:`~.ops.run`), the dense static-shape path (CUDA, meta,
  export), the CUDA kernel hook ``_cuda_impl`` and the internal switch ``FORCE_STATIC_PATH``.
"""
