"""Model runtimes shared by the agent, the hub's evaluation and the simulator: trainers (LiteRT, ONNX Runtime,
NumPy head), the backbone feature cache and local data loading. No TensorFlow or torch: runtimes are imported
lazily, inside functions."""
