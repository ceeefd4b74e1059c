"""defectforge synth stage: procedural and diffusion defect images with exact masks, into WebDataset shards."""
