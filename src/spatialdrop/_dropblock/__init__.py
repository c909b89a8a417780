"""DropBlock's internals, each job in its own module (the public op and modules are in ``drop_block``).

Start with :mod:`.ops`, the dispatcher: its table lists every path a call can take and the
module that implements it, :func:`~.ops.select_path` holds every condition that picks one, and
its docstring names the modules that every path shares.
"""
