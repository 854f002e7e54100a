"""Discrete-event cluster simulator that runs the same placement code as the live scheduler."""
