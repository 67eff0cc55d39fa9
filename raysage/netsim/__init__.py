"""The simulated world: device and link profiles, cost model, round planner. No Ray."""
