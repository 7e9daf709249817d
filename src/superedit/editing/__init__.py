"""The editing engine: keys, values, closed-form solves, weight deltas and the methods."""
