"""Device migration protocols (docs/architecture.md §1.4–§1.6, §7; docs/kernel-contract.md §5 v1, §6 v2): one
module per job, imported from the module that does it.

* ``protocol``  ``MigrationDriver`` (the hooks a session calls), ``Pending``, ``HookPhase``,
  ``DeviceDataSink``
* ``errors``    ``HookOrderError``, ``ForbiddenTransition``, ``DeviceMismatch``,
  ``DeviceTransitionError``
* ``record``    the device identity record (``save_state`` / ``check_state``)
* ``base``      ``DriverBase``: the hook sequences and the shared recovery sequence
* ``v1``, ``v1_codec``  the v1 migration region and its ``device_state`` bits
* ``v2``        the v2 MIG_DEVICE_STATE feature and its data fd
* ``probe``     which driver a device gets (v2, else v1, else NotMigratable)
"""
