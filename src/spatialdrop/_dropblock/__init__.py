"""DropBlock's internals, each job in its own module (the public op and modules are in ``drop_block``).

- :mod:`.ops`: the dispatch (:func:`~.ops.run`) and the table of DropBlock's three paths
  (sparse, dense, Triton): start there.
- :mod:`.sampling`: unkeyed seed draws and the one geometric-gap sampler; :mod:`.keyed_seeds`:
  the keyed seed rule (``draw_keyed_seeds``); :mod:`.seeds`: ``draw_grid``, the one entry point
  the torch paths draw through (the Triton kernel follows the same keyed rule).
- :mod:`.calibration`: the seed rate ``gamma`` for each seeding.
- :mod:`.geometry`: :class:`~.geometry.Geometry` (sizes of the map, blocks and seed grid) and the
  write plans that turn seeds into dropped positions, sparse (:func:`~.geometry.block_plan`) or
  dense (:func:`~.geometry.grow_blocks`).
- :mod:`.scale`: the one scale policy (``expected``, ``realized``, ``none``).
- :mod:`.sparse`: the CPU path's custom ops ``spatialdrop::drop_block`` and
  ``spatialdrop::drop_block_backward``; :mod:`.autograd`: their one formula each, vmap rules and
  torch.func form. :mod:`.fused` (over the C extension ``_cfused.c``): the CPU path's one-sweep
  multiply-and-zero for per-channel masks, and the seed sampler's float64 tail.
- :mod:`.dense`: the static-shape path of torch ops.
- :mod:`.triton_kernels` (launcher and op ``spatialdrop::drop_block_triton``) and
  :mod:`.triton_jit` (the kernels).
"""
