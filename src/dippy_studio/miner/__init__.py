"""The miner: serves signed inference and LoRA training jobs from the engine (`create_app`)."""
