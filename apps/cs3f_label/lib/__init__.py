"""CS3F MONAI Label app library: task configs, the anomaly infer task, and the engine around the bundle."""
