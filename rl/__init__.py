"""Reinforcement learning on learned state space models: environments, replay, agents, runner."""
