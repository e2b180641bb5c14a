"""A compression run: the engine, its calibration passes, the run state, callbacks, layer replay, caches."""
