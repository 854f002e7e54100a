"""The simulated engine: a real-time worker that times a real model on a modelled accelerator."""
