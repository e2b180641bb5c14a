"""Built-in lowrank-kit strategies (installed as ``lowrank_kit_plugins``), one module each.

Each module is registered through the ``lowrank_kit`` entry-point group, exactly as a
third-party plugin would be.
"""
