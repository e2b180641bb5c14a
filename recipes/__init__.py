"""The shipped recipes: installed as ``lowrank_kit.recipes``, so a recipe can be named (``flat_llm``)."""
