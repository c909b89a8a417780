"""DropBlock's internals, each job in its own module (the public op and modules are in ``drop_block``).

Start with :mod:`.ops`, the dispatcher: its table lists every path a call can take, and
:func:`~.ops.select_path` holds every condition that picks one. The paths: the sparse custom
ops and their autograd (:mod:`.sparse`, :mod:`.autograd`, the C pass :mod:`.fused`), the
static-shape torch ops (:mod:`.dense`), the Triton kernels (:mod:`.triton_kernels`,
:mod:`.triton_jit`). What they share: the seed draws (:mod:`.sampling`, keyed:
:mod:`.keyed_seeds`), the seed rate (:mod:`.calibration`), where blocks land
(:mod:`.geometry`), the scale policy (:mod:`.scale`) and a DTensor shard's window (:mod:`.window`).
"""
