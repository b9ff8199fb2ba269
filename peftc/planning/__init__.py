"""Stage 2, the plan: the model graph on the meta device, plan data and its fingerprint, target
resolution, the compatibility table, the memory estimate, the planner and its rendering."""
