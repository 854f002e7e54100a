"""What the scheduler learns about requests before it places them (stateful, learnt online).

Placement never imports this package: it reads the results off the ``PlacementRequest``, which the
planner fills in. The simulator uses the same predictor.
"""
