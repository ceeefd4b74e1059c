"""defectforge pretrain stage."""
