"""World-model adapters: each pssm model family as an :class:`rl.world_model.WorldModel`."""
