"""Applications built on the backends and the SAELens integration: whole-SAE runs (`whole_sae`), activation
examples over a corpus (`contexts`), direction-adapter training (`train_direction_adapter`), evaluation
(`evaluation`) and the shipped demo SAE (`demo_sae`)."""
