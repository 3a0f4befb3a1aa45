"""The attention-only transformer with named activation sites, its fast training path, and the clamps."""
