"""Model families implementing the step contract on real diffusers components, and presets."""
